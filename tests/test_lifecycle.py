"""
A maildrop's lifecycle in the store, on both backends (the C{databaseURL}
fixture): storage use and quotas, retention, kept deleted mail, renaming,
expunging and the registry of POP3 sessions.

The store is driven synchronously here; where concurrency is the point
(two nodes delivering to one user at once), real worker threads run
against the real database.
"""

import pytest
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from mailgate.errors import NoSuchUser, QuotaExceeded
from mailgate.logs import eventAsRecord
from mailgate.message import spoolBytes
from mailgate.store import engineFromURL
from mailgate.store.bounds import formatSize, parseSize
from mailgate.store.database import Database
from mailgate.store.limits import DEFAULT, UNLIMITED
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


def nearlyFull(store, address, room=600):
    """
    Leave C{address} C{room} octets of its quota: C{message(n, 800)} does
    not fit them, yet is smaller than the whole quota (a message larger
    than that is refused for good:
    L{test_aMessageLargerThanTheWholeQuotaIsRefusedForGoodAtTheEndOfData}).
    """
    deliver(store, [address], message(0, 800))
    resultOf(store.setQuota(address, usage(store, address)[1] + room))


# -- contracts -------------------------------------------------------------------


def test_theStoreProvidesILifecycleStoreAndItsMaildropsIMaildrop(store):
    """
    What the lifecycle adds to the store and to a session's maildrop is
    declared (mailgate.interfaces), not found by duck typing.
    """
    from zope.interface.verify import verifyObject

    from mailgate.interfaces import ILifecycleStore, IMaildrop, IMailStore

    assert verifyObject(IMailStore, store)
    assert verifyObject(ILifecycleStore, store)
    identity = resultOf(store.findUser(ALICE))
    maildrop = resultOf(store.openMaildrop(identity))
    try:
        assert verifyObject(IMaildrop, maildrop)
        assert maildrop.expireDays is None
    finally:
        resultOf(maildrop.release())


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
    A database made before quotas existed (at version 2, the connection
    policy's tables, as main left it) is upgraded to version 3 and gets its
    use computed once, by the migration.
    """
    from mailgate.store import openSynchronousStore
    from mailgate.store.database import runTransaction
    from mailgate.store.schema import MIGRATIONS, _ensureVersionTable, applyMigration, currentVersion

    assert [m.version for m in MIGRATIONS[:3]] == [1, 2, 3]
    engine = engineFromURL(databaseURL)
    conn = engine.connect()
    try:

        def atVersion2(cursor):
            _ensureVersionTable(cursor)
            for migration in MIGRATIONS[:2]:
                applyMigration(cursor, engine, migration)

        runTransaction(engine, conn, atVersion2, (), {}, True)

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
            return currentVersion(cursor)

        assert runTransaction(engine, conn, old, (), {}, True) == 2
    finally:
        conn.close()
    upgraded = openSynchronousStore(databaseURL)
    try:
        assert upgraded.database.run(currentVersion) == MIGRATIONS[-1].version
        assert usage(upgraded, ALICE) == (2, 350)
        # The policy's tables, made by version 2, are still there.
        def banVersion(cursor):
            cursor.execute("SELECT version FROM ban_version")
            return [tuple(row) for row in cursor.fetchall()]

        assert upgraded.database.run(banVersion) == [(0,)]
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
    database = Database(engine, reactor)
    return SQLMailStore(database, engine.makeLocks(database))


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


# -- quotas at SMTP and LMTP --------------------------------------------------------

SENDER = "sender@example.net"


def intake(store, lmtp=False, quotaExceeded="temporary", metrics=None, clock=None):
    from mailgate.smtp import LMTPFactory, LocalDelivery, SMTPFactory
    from mailgate.testing import SMTPSession
    from twisted.internet.task import Clock

    factoryClass = LMTPFactory if lmtp else SMTPFactory
    timing = {} if clock is None else {"clock": clock.seconds}
    delivery = LocalDelivery(store, ["example.org"], quotaExceeded=quotaExceeded, **timing)
    factory = factoryClass(
        delivery,
        hostname="mailgate.test",
        reactor=Clock(),
        metrics=metrics,
    )
    session = SMTPSession(store, factory=factory, clock=factory.reactor)
    assert session.command("LHLO client.test" if lmtp else "EHLO client.test").startswith("250")
    return session


def data(session, body):
    assert session.command("DATA").startswith("354")
    return session.send(body + b".\r\n").decode()


def test_rcptRefusesARecipientTheDeclaredSizeWouldPutOverQuota(store):
    body = message(1, 2000)
    deliver(store, [ALICE], body)
    resultOf(store.setQuota(ALICE, len(body) + 1000))
    session = intake(store)
    assert session.command(f"MAIL FROM:<{SENDER}> SIZE=1001").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>") == f"452 4.2.2 <{ALICE}>: mailbox full\r\n"
    assert session.command(f"RCPT TO:<{BOB}>").startswith("250")
    assert session.command("RSET").startswith("250")
    # Room for the declared size and the trace fields mailgate adds.
    assert session.command(f"MAIL FROM:<{SENDER}> SIZE=700").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5")


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_rcptCountsTheTraceFieldsTheMessageWillBeStoredWith(store, lmtp):
    """
    The room a recipient needs at RCPT is for the message as it will be
    stored: its declared size and the Return-Path and Received fields
    mailgate puts before it (a few hundred octets).  Checked by the
    declared size alone, a recipient with room for that but not for the
    fields was accepted at RCPT and refused at the end of DATA, where
    SMTP's one reply refuses the message for every recipient (452 4.2.2,
    "the full recipient is refused at RCPT the next time"): every retry
    went the same way, and the recipients with room never got it, until
    the MTA bounced it for all of them.
    """
    body = message(1, 1000)
    deliver(store, [ALICE], message(0, 2000))
    resultOf(store.setQuota(ALICE, usage(store, ALICE)[1] + len(body) + 50))
    for attempt in range(2):
        session = intake(store, lmtp=lmtp)
        assert session.command(f"MAIL FROM:<{SENDER}> SIZE={len(body)}").startswith("250")
        assert session.command(f"RCPT TO:<{ALICE}>") == f"452 4.2.2 <{ALICE}>: mailbox full\r\n"
        assert session.command(f"RCPT TO:<{BOB}>").startswith("250")
        assert data(session, body).startswith("250 2.0.0")
    assert [m.size > len(body) for m in resultOf(store.listMessages(BOB))] == [True, True]
    assert len(resultOf(store.listMessages(ALICE))) == 1
    # With room for the fields too, she is taken, and the message fits.
    # (Her copy's Received field names her, not Bob.)
    stored = resultOf(store.listMessages(BOB))[0].size + len(ALICE) - len(BOB)
    resultOf(store.setQuota(ALICE, usage(store, ALICE)[1] + stored))
    session = intake(store, lmtp=lmtp)
    assert session.command(f"MAIL FROM:<{SENDER}> SIZE={len(body)}").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("250 2.1.5")
    assert data(session, body).startswith("250 2.0.0")
    assert len(resultOf(store.listMessages(ALICE))) == 2
    assert resultOf(store.listMessages(ALICE))[1].size == stored
    assert usage(store, ALICE)[1] == resultOf(store.quotaOf(ALICE)).quotaOctets
    # A declared size that, with the fields, is more than an empty
    # mailbox's whole quota can never fit: refused for good at RCPT.
    addUser(store, CAROL, "carol")
    resultOf(store.setQuota(CAROL, len(body) + 50))
    session = intake(store, lmtp=lmtp)
    assert session.command(f"MAIL FROM:<{SENDER}> SIZE={len(body)}").startswith("250")
    assert session.command(f"RCPT TO:<{CAROL}>").startswith("552 5.2.3")


@pytest.mark.parametrize("quotaExceeded", ["temporary", "permanent"])
@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_aMessageLargerThanTheWholeQuotaIsRefusedForGood(store, quotaExceeded, lmtp):
    """
    A declared size over the recipient's whole quota can never fit, however
    much room she makes: 552 5.2.3 at RCPT (the MTA bounces it at once),
    not 452 4.2.2 (retried for days, then bounced), whatever
    --quota-exceeded says; the other recipients are taken.
    """
    resultOf(store.setQuota(ALICE, 1000))
    session = intake(store, lmtp=lmtp, quotaExceeded=quotaExceeded)
    assert session.command(f"MAIL FROM:<{SENDER}> SIZE=1001").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>") == (
        f"552 5.2.3 <{ALICE}>: message larger than the mailbox's whole quota (1000 octets)\r\n"
    )
    assert session.command(f"RCPT TO:<{BOB}>").startswith("250")


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_recipientsRefusedAtRcptAreCounted(store, lmtp):
    """
    A recipient refused at RCPT is counted by why
    (C{mailgate_recipients_refused_total}): a full mailbox is refused
    there as a rule (the MTA declares the size, or the mailbox is full
    already), and such mail never reaches DATA, where
    C{mailgate_deliveries_total} counts: mailboxes refusing mail for days
    showed in no metric, only in the log.
    """
    from mailgate.metrics import Metrics
    from test_metrics import value

    protocol = "lmtp" if lmtp else "smtp"
    metrics = Metrics()

    def refused(reason):
        return value(metrics, "mailgate_recipients_refused_total", protocol=protocol, reason=reason)

    nearlyFull(store, ALICE)
    resultOf(store.setQuota(BOB, 1000))
    session = intake(store, lmtp=lmtp, metrics=metrics)
    assert session.command(f"MAIL FROM:<{SENDER}> SIZE=1000").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("452 4.2.2")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("452 4.2.2")
    assert session.command(f"RCPT TO:<{BOB}>").startswith("552 5.2.3")
    assert session.command("RCPT TO:<nobody@example.org>").startswith("550 5.1.1")
    assert session.command("RCPT TO:<someone@example.com>").startswith("550 5.7.1")
    assert session.command("RCPT TO:<bad address>").startswith("501")
    assert (refused("mailbox_full"), refused("larger_than_quota"), refused("no_such_user")) == (2, 1, 1)
    assert (refused("relay_denied"), refused("bad_syntax"), refused("other")) == (1, 1, 0)
    assert value(metrics, "mailgate_deliveries_total", protocol=protocol, result="tempfail") == 0


def test_rcptRefusesARecipientAlreadyFullWithoutADeclaredSize(store):
    from mailgate.smtp import LocalDelivery
    from twisted.internet.task import Clock

    body = message(1)
    deliver(store, [ALICE], body)
    clock = Clock()
    session = intake(store, clock=clock)
    # No quota yet: she is accepted (and remembered as unlimited, for
    # LocalDelivery.knownLifetime seconds).
    assert session.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert session.command("RSET").startswith("250")
    # A quota set meanwhile (by the admin command, say) counts at RCPT once
    # that while is over (within it, the end of DATA checks it).
    resultOf(store.setQuota(ALICE, len(body)))
    clock.advance(LocalDelivery.knownLifetime + 1)
    assert session.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>") == f"452 4.2.2 <{ALICE}>: mailbox full\r\n"
    # A recipient with a quota is never answered from memory: the next
    # RCPT asks again, and is refused again.
    assert session.command("RSET").startswith("250")
    assert session.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>") == f"452 4.2.2 <{ALICE}>: mailbox full\r\n"


def test_permanentQuotaRefusals(store):
    body = message(1, 2000)
    deliver(store, [ALICE], body)
    resultOf(store.setQuota(ALICE, usage(store, ALICE)[1] + 50))
    session = intake(store, quotaExceeded="permanent")
    assert session.command(f"MAIL FROM:<{SENDER}> SIZE=100").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>") == f"552 5.2.2 <{ALICE}>: mailbox full\r\n"


def test_smtpRefusesTheWholeMessageWhenTheRealSizeIsOverQuota(store):
    """
    The size declared was small (or none was), the data is larger: at the
    end of DATA the real size decides, and with SMTP nobody gets the
    message (one reply for all recipients).
    """
    resultOf(store.setQuota(ALICE, 600))
    session = intake(store)
    assert session.command(f"MAIL FROM:<{SENDER}> SIZE=50").startswith("250")
    assert session.command(f"RCPT TO:<{BOB}>").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("250")
    reply = data(session, message(1, 800))
    assert reply == f"452 4.2.2 <{ALICE}>: mailbox full\r\n"
    assert resultOf(store.listMessages(ALICE)) == []
    assert resultOf(store.listMessages(BOB)) == []
    assert usage(store, BOB) == (0, 0)
    # The session goes on: a message that fits is delivered.
    assert session.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert data(session, b"Subject: small\r\n\r\nhi\r\n").startswith("250 2.0.0")


def test_smtpPermanentRefusalAtTheEndOfData(store):
    nearlyFull(store, ALICE)
    session = intake(store, quotaExceeded="permanent")
    assert session.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert data(session, message(1, 800)) == f"552 5.2.2 <{ALICE}>: mailbox full\r\n"


def test_smtpPermanentRefusalNeverBouncesRecipientsWithRoom(store):
    """
    With permanent refusals, an SMTP message over one recipient's quota at
    the end of DATA is still refused only temporarily when another
    recipient has room: one reply answers for all, and a 552 would bounce
    it for her too.  The MTA's next attempt declares the size, the full
    recipient is refused at RCPT, and the other gets the message.
    """
    resultOf(store.setQuota(ALICE, 600))
    session = intake(store, quotaExceeded="permanent")
    body = message(1, 800)
    assert session.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert session.command(f"RCPT TO:<{BOB}>").startswith("250")
    assert data(session, body) == f"452 4.2.2 <{ALICE}>: mailbox full; try the others again\r\n"
    assert resultOf(store.listMessages(BOB)) == []
    # The retry, as an MTA makes it.
    assert session.command(f"MAIL FROM:<{SENDER}> SIZE={len(body)}").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>") == (
        f"552 5.2.3 <{ALICE}>: message larger than the mailbox's whole quota (600 octets)\r\n"
    )
    assert session.command(f"RCPT TO:<{BOB}>").startswith("250")
    assert data(session, body).startswith("250 2.0.0")
    assert len(resultOf(store.listMessages(BOB))) == 1
    assert resultOf(store.listMessages(ALICE)) == []


def test_lmtpAnswersEachRecipientForItsOwnQuota(store):
    nearlyFull(store, ALICE)
    session = intake(store, lmtp=True)
    assert session.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert session.command(f"RCPT TO:<{BOB}>").startswith("250")
    replies = data(session, message(1, 800)).splitlines()
    assert replies[0] == f"452 4.2.2 <{ALICE}>: mailbox full"
    assert replies[1].startswith(f"250 2.0.0 <{BOB}> delivered as ")
    assert len(replies) == 2
    assert len(resultOf(store.listMessages(ALICE))) == 1
    assert len(resultOf(store.listMessages(BOB))) == 1


@pytest.mark.parametrize("quotaExceeded", ["temporary", "permanent"])
def test_aMessageLargerThanTheWholeQuotaIsRefusedForGoodAtTheEndOfData(store, quotaExceeded):
    """
    A client that declared no size is refused at the end of the data: a
    message larger than the recipient's whole quota gets 552 5.2.3 there
    too, as at RCPT for a declared size, whatever --quota-exceeded says
    (a 452 4.2.2 had the MTA retry for days what no room made would ever
    fit).  LMTP answers the recipient so, and delivers to the others;
    SMTP refuses the message so when it fits no recipient's quota, and
    temporarily when another had room (its retry declares the size, and
    RCPT refuses the recipient: L{test_smtpPermanentRefusalNeverBouncesRecipientsWithRoom}).
    """
    addUser(store, CAROL, "password")
    resultOf(store.setQuota(ALICE, 600))
    resultOf(store.setQuota(CAROL, 700))
    tooLarge = f"552 5.2.3 <{ALICE}>: message larger than the mailbox's whole quota (600 octets)"
    smtp = intake(store, quotaExceeded=quotaExceeded)
    assert smtp.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert smtp.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert data(smtp, message(1, 800)) == tooLarge + "\r\n"
    assert smtp.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert smtp.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert smtp.command(f"RCPT TO:<{CAROL}>").startswith("250")
    assert data(smtp, message(2, 800)) == (
        f"552 5.2.3 <{ALICE}, {CAROL}>: message larger than each mailbox's whole quota\r\n"
    )
    lmtp = intake(store, lmtp=True, quotaExceeded=quotaExceeded)
    assert lmtp.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert lmtp.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert lmtp.command(f"RCPT TO:<{BOB}>").startswith("250")
    replies = data(lmtp, message(3, 800)).splitlines()
    assert replies[0] == tooLarge
    assert replies[1].startswith(f"250 2.0.0 <{BOB}> delivered as ")
    assert resultOf(store.listMessages(ALICE)) == resultOf(store.listMessages(CAROL)) == []
    assert len(resultOf(store.listMessages(BOB))) == 1



def named(events, name):
    return [e for e in events if e.get("event") == name]


def test_aRecipientOverQuotaIsNotABadCommand(store):
    """
    A recipient refused for its quota is a fair request refused: an MTA
    with many full recipients is not closed as a client sending bad
    commands.
    """
    body = message(1, 2000)
    deliver(store, [ALICE], body)
    resultOf(store.setQuota(ALICE, usage(store, ALICE)[1] + 50))
    session = intake(store)
    assert session.command(f"MAIL FROM:<{SENDER}> SIZE=100").startswith("250")
    limit = session.protocol.maxBadCommands
    for _ in range(limit + 5):
        assert session.command(f"RCPT TO:<{ALICE}>") == f"452 4.2.2 <{ALICE}>: mailbox full\r\n"
    assert not session.disconnected
    assert session.command(f"RCPT TO:<{BOB}>").startswith("250")


@pytest.mark.parametrize("permanent", [False, True], ids=["temporary", "permanent"])
def test_smtpQuotaRefusalIsADeliveryCountedAndLogged(store, logEvents, permanent):
    from test_observability import RecordingMetrics

    metrics = RecordingMetrics()
    nearlyFull(store, ALICE)
    session = intake(store, quotaExceeded="permanent" if permanent else "temporary", metrics=metrics)
    assert session.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert data(session, message(1, 800)).startswith("552 5.2.2" if permanent else "452 4.2.2")
    assert metrics.named("delivery") == [("smtp", "rejected" if permanent else "tempfail")]
    [event] = named(logEvents, "smtp.delivery_failed")
    assert event["reason"] == "mailbox full" and event["session"] == session.protocol.sessionId
    assert not named(logEvents, "smtp.delivered")


def test_lmtpQuotaRefusalsAreCountedPerRecipient(store, logEvents):
    from test_observability import RecordingMetrics

    metrics = RecordingMetrics()
    nearlyFull(store, ALICE)
    session = intake(store, lmtp=True, metrics=metrics)
    assert session.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert session.command(f"RCPT TO:<{BOB}>").startswith("250")
    data(session, message(1, 800))
    accepted, refused = metrics.named("delivery")
    # Bob's copy was stored (its octets and time counted), Alice's refused.
    assert accepted[:2] == ("lmtp", "accepted") and accepted[2][0] == "octets"
    assert refused == ("lmtp", "tempfail")
    [event] = named(logEvents, "lmtp.delivered")
    assert event["full"] == [ALICE] and [e["recipient"] for e in event["uniqueIds"]] == [BOB]
    # Only a full recipient: no accepted delivery at all.
    del metrics.calls[:]
    assert session.command(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert data(session, message(2, 800)).startswith("452 4.2.2")
    assert metrics.named("delivery") == [("lmtp", "tempfail")]


# -- options ------------------------------------------------------------------------


def test_twistdOptions(monkeypatch):
    from twisted.python import usage

    from mailgate import tap

    monkeypatch.delenv("MAILGATE_DATABASE", raising=False)

    def parse(*argv):
        options = tap.Options()
        options.parseOptions(list(argv))
        return options.toConfig()

    config = parse()
    assert (config.defaultQuota, config.quotaExceeded, config.expireDays, config.keepDeletedDays) == (
        None, "temporary", None, 0,
    )
    config = parse(
        "--default-quota", "1G", "--quota-exceeded", "permanent",
        "--expire-days", "30", "--keep-deleted-days", "7",
    )
    assert (config.defaultQuota, config.quotaExceeded, config.expireDays, config.keepDeletedDays) == (
        1 << 30, "permanent", 30, 7,
    )
    assert parse("--expire-days", "never").expireDays is None
    for argv in (
        ["--default-quota", "lots"],
        ["--quota-exceeded", "sometimes"],
        ["--expire-days", "-1"],
        ["--keep-deleted-days", "x"],
    ):
        with pytest.raises(usage.UsageError):
            parse(*argv)


def test_theOptionsInAConfigurationFile(tmp_path, monkeypatch):
    """
    The same settings as configuration file keys: sizes as a number of
    octets or with a unit, days as a number or "never"; a wrong value
    names its key.
    """
    from mailgate import tap

    monkeypatch.delenv("MAILGATE_DATABASE", raising=False)

    def parse(text):
        path = tmp_path / "mailgate.toml"
        path.write_text(text)
        options = tap.Options()
        options.parseOptions(["--config", str(path)])
        return options.toConfig()

    config = parse('default-quota = "500M"\nexpire-days = "never"\nkeep-deleted-days = 2\n')
    assert (config.defaultQuota, config.expireDays, config.keepDeletedDays) == (500 << 20, None, 2)
    config = parse('default-quota = 1048576\nexpire-days = 14\nquota-exceeded = "permanent"\n')
    assert (config.defaultQuota, config.expireDays, config.quotaExceeded) == (1 << 20, 14, "permanent")
    for text, key in (
        ('default-quota = "lots"\n', "default-quota"),
        ("default-quota = true\n", "default-quota"),
        ('expire-days = "soon"\n', "expire-days"),
        ("keep-deleted-days = -1\n", "keep-deleted-days"),
    ):
        with pytest.raises(SystemExit) as e:
            parse(text)
        assert f"key {key!r}" in str(e.value)


def test_serviceGivesTheStoreItsLimits(databaseURL):
    from twisted.internet.testing import MemoryReactor

    from mailgate.service import MailgateConfig, makeService

    s = memoryStore(databaseURL)
    try:
        makeService(
            MailgateConfig(database=databaseURL, pop3=[], defaultQuota=5000, expireDays=9, keepDeletedDays=3),
            reactor=MemoryReactor(),
            store=s,
        )
        assert (s.limits.quotaOctets, s.limits.expireDays, s.limits.keepDeletedDays) == (5000, 9, 3)
    finally:
        s.close()


# -- retention -------------------------------------------------------------------------

T0 = 1_700_000_000


class Clocked:
    """
    A store's clock, set by the test.
    """

    def __init__(self, store, now=T0):
        self.now = now
        store._clock = lambda: self.now

    def days(self, n):
        self.now += n * 86400


def test_retentionRemovesOldMessagesOnly(store):
    clock = Clocked(store)
    old = [message(n, 30) for n in range(3)]
    for body in old:
        deliver(store, [ALICE, BOB], body)
    clock.days(5)
    recent = message(9)
    deliver(store, [ALICE], recent)
    resultOf(store.setExpire(ALICE, 3))
    clock.days(0.5)
    assert resultOf(store.expireMessages()) == (3, 0)
    assert [m.size for m in resultOf(store.listMessages(ALICE))] == [len(recent)]
    assert usage(store, ALICE) == (1, len(recent))
    # Bob never set a retention and the server has none: all his stay.
    assert len(resultOf(store.listMessages(BOB))) == 3
    # Nothing left to do.
    assert resultOf(store.expireMessages()) == (0, 0)


def test_retentionDefaultAndNever(store):
    clock = Clocked(store)
    deliver(store, [ALICE, BOB], message(1))
    store.limits.expireDays = 2
    resultOf(store.setExpire(BOB, UNLIMITED))
    clock.days(1)
    assert resultOf(store.expireMessages()) == (0, 0)
    clock.days(2)
    assert resultOf(store.expireMessages()) == (1, 0)
    assert resultOf(store.listMessages(ALICE)) == []
    assert len(resultOf(store.listMessages(BOB))) == 1
    resultOf(store.setExpire(BOB, DEFAULT))
    assert resultOf(store.expireMessages()) == (1, 0)
    assert resultOf(store.listMessages(BOB)) == []


def test_retentionWorksInSmallTransactions(store):
    clock = Clocked(store)
    for n in range(7):
        deliver(store, [ALICE], message(n))
    store.limits.expireDays = 1
    clock.days(2)
    transactions = []
    runWrite = store.database.runWrite

    def counting(function, *args, **kwargs):
        transactions.append(function.__name__)
        return runWrite(function, *args, **kwargs)

    store.database.runWrite = counting
    assert resultOf(store.expireMessages(messagesPerTransaction=3)) == (7, 0)
    assert transactions == ["_expireUser"] * 3
    assert usage(store, ALICE) == (0, 0)


def test_retentionSkipsAMaildropInUse(store):
    clock = Clocked(store)
    deliver(store, [ALICE], message(1))
    store.limits.expireDays = 1
    clock.days(2)
    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    assert resultOf(store.expireMessages()) == (0, 1)
    assert session.command("RETR 1").startswith("+OK")
    assert session.command("QUIT").startswith("+OK")
    assert resultOf(store.expireMessages()) == (1, 0)


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_retentionOnSeveralNodesAtOnce(databaseURL):
    """
    Two nodes: a maildrop locked by a POP3 session on one is skipped by
    the other; and both running the task at the same time remove each
    old message exactly once (use and bodies stay exact).
    """
    import threading

    nodes = [memoryStore(databaseURL) for _ in range(2)]
    try:
        a, b = nodes
        addUser(a, ALICE, "wonderland")
        addUser(a, BOB, "builder")
        for node in nodes:
            Clocked(node)
            node.limits.expireDays = 1
        for n in range(40):
            deliver(a, [ALICE, BOB], message(n, n))
        deliver(a, [BOB], message(99))
        for node in nodes:
            node._clock = lambda: T0 + 2 * 86400

        session = POP3Session(a)
        assert session.login(ALICE, "wonderland").startswith("+OK")
        removed, busy = resultOf(b.expireMessages(messagesPerTransaction=7))
        assert (removed, busy) == (41, 1)
        assert session.command("QUIT").startswith("+OK")

        results = []

        def expire(node):
            results.append(resultOf(node.expireMessages(messagesPerTransaction=3)))

        threads = [threading.Thread(target=expire, args=(node,)) for node in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sum(r[0] for r in results) == 40, results
        assert resultOf(a.listMessages(ALICE)) == [] and resultOf(a.listMessages(BOB)) == []
        assert usage(a, ALICE) == usage(a, BOB) == (0, 0)
        from test_store import query

        assert query(a, "SELECT count(*) FROM bodies") == [(0,)]
        assert query(a, "SELECT count(*) FROM body_chunks") == [(0,)]
    finally:
        for node in nodes:
            node.close()


def test_retentionServiceRunsPeriodically(store):
    from twisted.internet.testing import MemoryReactorClock

    from mailgate.store.housekeeping import RetentionService

    clock = Clocked(store)
    deliver(store, [ALICE], message(1))
    store.limits.expireDays = 1
    reactor = MemoryReactorClock()
    service = RetentionService(store, reactor, interval=60)
    service.startService()
    # Nothing runs before the reactor does (twistd starts services first).
    assert not reactor.getDelayedCalls()
    reactor.run()
    try:
        reactor.advance(60)
        assert len(resultOf(store.listMessages(ALICE))) == 1
        clock.days(2)
        reactor.advance(60)
        assert resultOf(store.listMessages(ALICE)) == []
    finally:
        service.stopService()
    assert not reactor.getDelayedCalls()


def test_aRoundGoesOnPastAPageOfMaildropsWithNothingToRemove(store):
    """
    A round of the retention task goes on to the next maildrops when a
    pass found nothing to remove in a whole page of them: a POP3 deletion
    leaves a maildrop's oldest arrival behind (a lower bound), so the
    maildrops of users who download and delete come first as candidates,
    have nothing to remove, and used to end the round there, leaving
    the expired mail of the maildrops after them for the next round, ten
    minutes later (at 100 maildrops a round: never caught up with a
    server of many such users).
    """
    from twisted.internet.testing import MemoryReactorClock

    from mailgate.store.housekeeping import RetentionService

    addUser(store, CAROL, "carol")
    clock = Clocked(store)
    store.limits.expireDays = 1
    for address, password in ((ALICE, "wonderland"), (BOB, "builder")):
        deliver(store, [address], message(1))
        popDelete(store, address, password, 1)
    clock.days(0.1)
    deliver(store, [CAROL], message(2))
    clock.days(2)
    service = RetentionService(store, MemoryReactorClock())
    service.usersPerPass = 2
    assert resultOf(service.runOnce()) == (1, 0)
    assert resultOf(store.listMessages(CAROL)) == []


def test_theRetentionTaskLogsEachMaildropItRemovedMessagesFrom(store, logEvents):
    """
    Each maildrop the retention task removed messages from is named in a
    line of its own (C{retention.expired}: the user, how many, the
    retention it went by), as a POP3 session's deletions are in its
    C{pop3.logout} line: "where did my mail go" can be looked up.  Never
    a message's content; a maildrop with nothing to remove has no line.
    """
    from twisted.internet.testing import MemoryReactorClock

    from mailgate.store.housekeeping import RetentionService

    clock = Clocked(store)
    store.limits.expireDays = 30
    resultOf(store.setExpire(BOB, 2))
    for n in range(3):
        deliver(store, [ALICE, BOB], message(n, 10))
    clock.days(10)
    deliver(store, [ALICE], message(9, 10))
    resultOf(store.setExpire(ALICE, 5))
    clock.days(1)
    service = RetentionService(store, MemoryReactorClock())
    assert resultOf(service.runOnce()) == (6, 0)
    lines = sorted(
        (e["user"], e["messages"], e["days"], formatEvent(e)) for e in logEvents if e.get("event") == "retention.expired"
    )
    assert lines == [
        (ALICE, 3, 5, f"retention expired user={ALICE} messages=3 days=5"),
        (BOB, 3, 2, f"retention expired user={BOB} messages=3 days=2"),
    ]
    assert not any("Subject" in repr(e) for e in logEvents if str(e.get("event")).startswith("retention."))
    [total] = [e for e in logEvents if e.get("event") == "retention.removed"]
    assert formatEvent(total) == "retention: removed 6 expired messages and 0 kept deleted messages"
    # In JSON, the maildrops skipped as in use are a number, not a clause.
    assert eventAsRecord(total)["busy"] == 0


def test_whatAPassRemovedBeforeAWriteFailedIsStillToldAndCounted(store, logEvents, monkeypatch):
    """
    A pass of the retention task whose write fails at one maildrop (the
    database away) has committed the removals from the maildrops before
    it: they are still logged (C{retention.expired}) and counted
    (C{mailgate_retention_removed_messages_total}), and the round is
    counted as failed.  Before, the failure lost the whole pass's
    account: alice's three messages gone, with no line saying where.
    """
    from twisted.internet.testing import MemoryReactorClock

    from mailgate.errors import TemporaryFailure
    from mailgate.metrics import Metrics
    from mailgate.store import lifecycle
    from mailgate.store.housekeeping import RetentionService
    from test_metrics import value

    metrics = Metrics()
    clock = Clocked(store)
    store.limits.expireDays = 1
    for n in range(3):
        deliver(store, [ALICE], message(n))
    clock.days(1)
    deliver(store, [BOB], message(9))
    clock.days(2)
    bob = resultOf(store.findUser(BOB)).userId
    expireUser = lifecycle._expireUser

    def failingForBob(cursor, userId, *args):
        if userId == bob:
            raise TemporaryFailure("the database went away")
        return expireUser(cursor, userId, *args)

    monkeypatch.setattr(lifecycle, "_expireUser", failingForBob)
    service = RetentionService(store, MemoryReactorClock(), metrics=metrics)
    assert resultOf(service.runOnce()) == (0, 0)
    assert [(e["user"], e["messages"]) for e in logEvents if e.get("event") == "retention.expired"] == [(ALICE, 3)]
    assert value(metrics, "mailgate_retention_removed_messages_total", kind="expired") == 3
    assert value(metrics, "mailgate_retention_rounds_total", result="failed") == 1
    assert [e for e in logEvents if e.get("log_level").name == "warn" and "went away" in formatEvent(e)]
    assert len(resultOf(store.listMessages(ALICE))) == 0
    assert len(resultOf(store.listMessages(BOB))) == 1


def test_theRetentionTaskIsCountedInTheMetrics(store):
    """
    What the retention task removes, expired messages and purged kept
    mail, is counted (C{mailgate_retention_removed_messages_total}), and
    so is each round by how it ended
    (C{mailgate_retention_rounds_total}: C{completed}, C{failed},
    C{skipped} while the node's clock runs ahead): an alert can watch a
    task that no longer completes, which the log tells only as a warning
    per round, or a sudden rise in what it removes.
    """
    from twisted.internet.testing import MemoryReactorClock

    from mailgate.metrics import Metrics
    from mailgate.store.housekeeping import RetentionService
    from mailgate.store.registry import ClockOffset
    from test_metrics import value

    metrics = Metrics()
    clock = Clocked(store)
    store.limits.expireDays = 1
    store.limits.keepDeletedDays = 1
    for n in range(3):
        deliver(store, [ALICE], message(n))
    popDelete(store, ALICE, "wonderland", 1)
    clock.days(2)
    service = RetentionService(store, MemoryReactorClock(), metrics=metrics)

    def counted():
        return (
            {kind: value(metrics, "mailgate_retention_removed_messages_total", kind=kind) for kind in ("expired", "purged")},
            {r: value(metrics, "mailgate_retention_rounds_total", result=r) for r in ("completed", "failed", "skipped")},
        )

    assert counted() == ({"expired": 0, "purged": 0}, {"completed": 0, "failed": 0, "skipped": 0})
    assert resultOf(service.runOnce()) == (2, 1)
    assert counted() == ({"expired": 2, "purged": 1}, {"completed": 1, "failed": 0, "skipped": 0})

    store.sessions.clockOffset = ClockOffset(3600.0, 0.01)
    assert resultOf(service.runOnce()) == (0, 0)
    store.sessions.clockOffset = None
    assert counted()[1] == {"completed": 1, "failed": 0, "skipped": 1}

    def broken(*args, **kwargs):
        raise RuntimeError("the retention pass failed")

    store.expireMessages = broken
    assert resultOf(service.runOnce()) == (0, 0)
    assert counted() == ({"expired": 2, "purged": 1}, {"completed": 1, "failed": 1, "skipped": 1})


def test_expireCapability(store):
    def capa(session):
        return [line for line in session.command("CAPA").split("\r\n") if line.startswith("EXPIRE")]

    def sessionFactory():
        from mailgate.testing import pop3Factory

        return pop3Factory(store, expire=store.retention.capability)

    # No retention anywhere: NEVER, as before.
    assert capa(POP3Session(store, factory=sessionFactory())) == ["EXPIRE NEVER"]
    store.limits.expireDays = 30
    assert capa(POP3Session(store, factory=sessionFactory())) == ["EXPIRE 30"]
    # Alice keeps mail 7 days: before login, the shortest (what holds for
    # whoever logs in), and USER says values differ.
    resultOf(store.setExpire(ALICE, 7))
    resultOf(store.retention.refresh())
    session = POP3Session(store, factory=sessionFactory())
    assert capa(session) == ["EXPIRE 7 USER"]
    assert session.login(ALICE, "wonderland").startswith("+OK")
    assert capa(session) == ["EXPIRE 7"]
    session.command("QUIT")
    session = POP3Session(store, factory=sessionFactory())
    assert session.login(BOB, "builder").startswith("+OK")
    assert capa(session) == ["EXPIRE 30"]
    session.command("QUIT")
    resultOf(store.setExpire(BOB, UNLIMITED))
    resultOf(store.retention.refresh())
    session = POP3Session(store, factory=sessionFactory())
    assert session.login(BOB, "builder").startswith("+OK")
    assert capa(session) == ["EXPIRE NEVER"]


def test_expireBeforeLoginIsTheShortestRetentionAnyUserHas(store, monkeypatch):
    """
    RFC 2449 section 6.7: EXPIRE's argument is the server-guaranteed
    minimum retention, and before login the client may be any user: the
    value must hold for all of them, the shortest (NEVER the longest),
    USER telling the client to ask again after login.  The server's
    default was announced, promising the users with a shorter retention
    of their own more than they get.
    """
    from mailgate.testing import pop3Factory

    def capa():
        session = POP3Session(store, factory=pop3Factory(store, expire=store.retention.capability))
        return [line for line in session.command("CAPA").split("\r\n") if line.startswith("EXPIRE")]

    # The default keeps mail for ever; Bob's is removed after 30 days.
    resultOf(store.setExpire(BOB, 30))
    resultOf(store.retention.refresh())
    assert capa() == ["EXPIRE 30 USER"]
    # Every user's own value longer than the default: the default.
    store.limits.expireDays = 10
    resultOf(store.setExpire(ALICE, UNLIMITED))
    resultOf(store.retention.refresh())
    assert capa() == ["EXPIRE 10 USER"]
    # Shorter ones: the shortest.
    resultOf(store.setExpire(ALICE, 3))
    resultOf(store.retention.refresh())
    assert capa() == ["EXPIRE 3 USER"]
    # Read from memory, as refreshed: a CAPA is no trip to the database.
    def noTrip(*args, **kwargs):
        raise AssertionError("CAPA went to the database")

    monkeypatch.setattr(store.database, "runInteraction", noTrip)
    assert capa() == ["EXPIRE 3 USER"]


# -- kept deleted mail -----------------------------------------------------------------


def popDelete(store, address, password, *numbers):
    """
    A POP3 session that deletes C{numbers} and quits; its UIDL listing
    before the deletions.
    """
    session = POP3Session(store)
    assert session.login(address, password).startswith("+OK")
    listing = session.command("UIDL").split("\r\n")[1:-2]
    for n in numbers:
        assert session.command(f"DELE {n}").startswith("+OK")
    assert session.command("QUIT").startswith("+OK")
    return [line.split()[1] for line in listing]


def uidlOf(store, address, password):
    session = POP3Session(store)
    assert session.login(address, password).startswith("+OK")
    listing = session.command("UIDL").split("\r\n")[1:-2]
    session.command("QUIT")
    return [line.split()[1] for line in listing]


def bodyCount(store):
    from test_store import query

    return query(store, "SELECT count(*) FROM bodies")[0][0], query(store, "SELECT count(*) FROM body_chunks")[0][0]


def test_deletedMailIsKeptOutOfPop3AndOutOfTheQuota(store):
    Clocked(store)
    store.limits.keepDeletedDays = 3
    bodies = [message(n, 10 * n) for n in range(4)]
    for body in bodies:
        deliver(store, [ALICE], body)
    ids = popDelete(store, ALICE, "wonderland", 2, 3)
    assert uidlOf(store, ALICE, "wonderland") == [ids[0], ids[3]]
    assert usage(store, ALICE) == (2, len(bodies[0]) + len(bodies[3]))
    kept = resultOf(store.listDeleted(ALICE))
    assert [(k.number, k.size, k.uniqueId, k.deletedAt, k.deletedBy) for k in kept] == [
        (1, len(bodies[1]), ids[1], T0, "127.0.0.1:40000"),
        (2, len(bodies[2]), ids[2], T0, "127.0.0.1:40000"),
    ]


def test_restoreUnderTheOriginalUniqueIds(store):
    store.limits.keepDeletedDays = 3
    bodies = [message(n, 10 * n) for n in range(4)]
    for body in bodies:
        deliver(store, [ALICE], body)
    ids = popDelete(store, ALICE, "wonderland", 1, 3)
    restored, missing = resultOf(store.restoreDeleted(ALICE, [ids[2], "no-such-id"]))
    assert restored == [(ids[2], ids[2])]
    assert missing == ["no-such-id"]
    # Back under its own id, after the others, as new mail comes.
    assert uidlOf(store, ALICE, "wonderland") == [ids[1], ids[3], ids[2]]
    assert usage(store, ALICE) == (3, sum(map(len, bodies[1:])))
    session = POP3Session(store)
    session.login(ALICE, "wonderland")
    assert session.command("RETR 3").endswith(bodies[2].decode() + ".\r\n")
    session.command("QUIT")
    assert [k.uniqueId for k in resultOf(store.listDeleted(ALICE))] == [ids[0]]
    # A later delivery comes after it, under an id of its own.
    later = deliver(store, [ALICE], message(9))[ALICE]
    assert uidlOf(store, ALICE, "wonderland") == [ids[1], ids[3], ids[2], later]
    assert later not in ids


def test_restoreAllSinceATime(store):
    clock = Clocked(store)
    store.limits.keepDeletedDays = 3
    for n in range(3):
        deliver(store, [ALICE], message(n))
    ids = popDelete(store, ALICE, "wonderland", 1)
    clock.days(1)
    popDelete(store, ALICE, "wonderland", 1, 2)
    restored, missing = resultOf(store.restoreDeleted(ALICE, since=T0 + 3600))
    assert [old for old, _ in restored] == ids[1:]
    assert missing == []
    assert uidlOf(store, ALICE, "wonderland") == ids[1:]
    restored, _ = resultOf(store.restoreDeleted(ALICE))
    assert [old for old, _ in restored] == ids[:1]
    # Each restore puts what it brings back after the others.
    assert uidlOf(store, ALICE, "wonderland") == ids[1:] + ids[:1]


def test_restoringAllComesBackABoundedNumberAtATime(databaseURL, store):
    """
    C{mailbox restore} of all the kept mail brings it back a bounded
    number of messages per transaction, in its order, after the others:
    between two of them another process delivers (on SQLite, one
    transaction for all held the one write lock the whole restore: 1.7 to
    2.8 s for 100,000 messages, every delivery to every user waiting).
    What a POP3 client deletes while the restore runs stays deleted.
    """
    clock = Clocked(store)
    store.limits.keepDeletedDays = 3
    for n in range(6):
        deliver(store, [ALICE], message(n))
    ids = popDelete(store, ALICE, "wonderland", 1, 2, 3, 4, 5)
    clock.days(1)
    other = memoryStore(databaseURL)
    progress = []
    meanwhile = []

    def committed(count):
        progress.append(count)
        if len(progress) == 1:
            # Delivered, and the message that stayed deleted by a POP3
            # client, while the restore runs: neither is the restore's.
            meanwhile.append(deliver(other, [ALICE, BOB], message(10))[ALICE])
            other._clock = lambda: clock.now + 1
            other.limits.keepDeletedDays = 3
            popDelete(other, ALICE, "wonderland", 1)

    try:
        restored, missing = resultOf(store.restoreDeleted(ALICE, perTransaction=2, progress=committed))
    finally:
        other.close()
    assert progress == [2, 4, 5]
    assert ([old for old, _ in restored], missing) == (ids[:5], [])
    # The first two came back before the delivery made meanwhile, the
    # others after it; the message that had stayed, deleted meanwhile,
    # stays deleted.
    assert uidlOf(store, ALICE, "wonderland") == [ids[0], ids[1], meanwhile[0], *ids[2:5]]
    assert [k.uniqueId for k in resultOf(store.listDeleted(ALICE))] == [ids[5]]


def test_aRestoreRunWhereTheClockLagsBringsBackTheMailJustDeleted(databaseURL, store):
    """
    C{mailbox restore} of all the kept mail (or of what was deleted since
    a time), run on a host whose clock lags the node's that dated the
    deletions (an administrator's machine two minutes behind), brings
    back the messages deleted a minute before: it restored only those
    deleted before its own clock's now, and said C{0 messages restored},
    exit 0, of mail C{mailbox deleted} listed.
    """
    Clocked(store)
    store.limits.keepDeletedDays = 3
    for n in range(5):
        deliver(store, [ALICE], message(n))
    ids = popDelete(store, ALICE, "wonderland", 1, 2, 3, 4, 5)
    admin = memoryStore(databaseURL)
    try:
        admin._clock = lambda: T0 - 120
        restored, missing = resultOf(admin.restoreDeleted(ALICE, since=T0 - 3600, perTransaction=2))
        assert ([old for old, _ in restored], missing) == (ids, [])
        popDelete(store, ALICE, "wonderland", 1, 2, 3)
        restored, missing = resultOf(admin.restoreDeleted(ALICE, perTransaction=2))
    finally:
        admin.close()
    assert ([old for old, _ in restored], missing) == (ids[:3], [])
    assert uidlOf(store, ALICE, "wonderland") == ids[3:] + ids[:3]
    assert resultOf(store.listDeleted(ALICE)) == []


def test_theListingsTheCommandPrintsAreReadAPageAtATime(store):
    """
    C{mailbox list} and C{mailbox deleted} read their listing a page at a
    time as they print it: read whole, 100,000 messages took 56 MB (68 MB
    kept deleted ones) of the command's memory.  Each message is listed
    once, numbered in order; what is delivered after the listing began is
    not in it.
    """
    import tracemalloc

    store.limits.keepDeletedDays = 3
    items = [(f"many-{n:05d}", spoolBytes(b"Subject: %d\r\n\r\nhi\r\n" % n), T0 + n) for n in range(1500)]
    assert len(resultOf(store.importMessages(BOB, items))[0]) == 1500
    tracemalloc.start()
    try:
        listing = resultOf(store.listMessages(BOB, page=50))
        deliver(store, [BOB], message(1))
        listed = 0
        for info in listing:
            assert (info.number, info.uniqueId, info.arrived) == (listed + 1, items[listed][0], T0 + listed)
            listed += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert listed == 1500
    assert peak < 300_000, peak
    whole = resultOf(store.listMessages(BOB))
    assert [m.uniqueId for m in resultOf(store.listMessages(BOB, page=7))] == [m.uniqueId for m in whole]
    popDelete(store, BOB, "builder", 1, 2, 3, 4, 5)
    kept = resultOf(store.listDeleted(BOB))
    assert len(kept) == 5
    assert list(resultOf(store.listDeleted(BOB, page=2))) == kept
    assert failureOf(store.listMessages(CAROL, page=2)).check(NoSuchUser)
    assert failureOf(store.listDeleted(CAROL, page=2)).check(NoSuchUser)


def test_restoreAsNew(store):
    store.limits.keepDeletedDays = 3
    for n in range(3):
        deliver(store, [ALICE], message(n))
    ids = popDelete(store, ALICE, "wonderland", 1, 2)
    restored, _ = resultOf(store.restoreDeleted(ALICE, asNew=True))
    assert [old for old, _ in restored] == ids[:2]
    newIds = [new for _, new in restored]
    assert not set(newIds) & set(ids)
    # After the message that stayed, as if just delivered; a later
    # delivery gets yet another id.
    assert uidlOf(store, ALICE, "wonderland") == [ids[2], *newIds]
    later = deliver(store, [ALICE], message(9))[ALICE]
    assert later not in ids + newIds


@pytest.mark.parametrize("asNew", [False, True])
def test_aRestoredMessageHasAWholeRetentionPeriodAhead(store, asNew):
    """
    A message deleted a day before its retention ended and restored two
    days later is not removed for good by the next retention pass: its
    retention counts from the restore (the listing dates it then).
    """
    clock = Clocked(store)
    store.limits.keepDeletedDays = 30
    store.limits.expireDays = 10
    body = message(1)
    deliver(store, [ALICE], body)
    clock.days(9)
    popDelete(store, ALICE, "wonderland", 1)
    clock.days(3)
    [(_, uniqueId)] = resultOf(store.restoreDeleted(ALICE, asNew=asNew))[0]
    restoredAt = clock.now
    assert resultOf(store.expireMessages()) == (0, 0)
    [listed] = resultOf(store.listMessages(ALICE))
    assert (listed.uniqueId, listed.arrived) == (uniqueId, restoredAt)
    clock.days(9.9)
    assert resultOf(store.expireMessages()) == (0, 0)
    clock.days(0.2)
    assert resultOf(store.expireMessages()) == (1, 0)


def test_nodesKeepMailAsLongAsTheLiveNodeThatKeepsItLongest(databaseURL):
    """
    Two nodes on one database, given different retention settings (one
    restarted with a new configuration before the other): node A would
    expire mail after a day and keep nothing deleted, node B never
    expires and keeps deleted mail three days.  While B is alive, A's
    sessions keep what they delete and A's retention task removes nothing
    B would keep; once B has stopped, A goes by its own settings.
    """
    a, b = memoryStore(databaseURL), memoryStore(databaseURL)
    try:
        addUser(a, ALICE, "wonderland")
        clocks = [Clocked(a), Clocked(b)]
        a.limits.expireDays, a.limits.keepDeletedDays = 1, 0
        b.limits.expireDays, b.limits.keepDeletedDays = None, 3
        resultOf(b.sessions.flush())
        assert resultOf(a.sessions.otherSettings()) == [
            ("--expire-days", 1, b.sessions.name, -1),
            ("--keep-deleted-days", 0, b.sessions.name, 3),
        ]
        assert resultOf(b.sessions.otherSettings()) == []
        deliver(a, [ALICE], message(1))
        deliver(a, [ALICE], message(2))
        popDelete(a, ALICE, "wonderland", 1)
        assert len(resultOf(a.listDeleted(ALICE))) == 1
        for clock in clocks:
            clock.days(2)
        resultOf(b.sessions.flush())
        assert resultOf(a.expireMessages()) == (0, 0)
        assert resultOf(a.purgeDeleted()) == 0
        assert len(resultOf(a.listMessages(ALICE))) == 1
        assert len(resultOf(a.listDeleted(ALICE))) == 1
        # B stops: A's own settings apply.
        resultOf(b.sessions.leave())
        assert resultOf(a.sessions.otherSettings()) == []
        assert resultOf(a.expireMessages()) == (1, 0)
        assert resultOf(a.purgeDeleted()) == 1
        assert resultOf(a.listMessages(ALICE)) == resultOf(a.listDeleted(ALICE)) == []
    finally:
        a.close()
        b.close()


def test_aNodeWhoseHeartbeatStoppedNoLongerCounts(databaseURL):
    """
    A node killed outright leaves its row; once its heartbeat is older
    than the registry's SETTINGS_COUNT_FOR, its settings no longer hold
    back the others' retention.
    """
    from mailgate.store.registry import SETTINGS_COUNT_FOR

    a, b = memoryStore(databaseURL), memoryStore(databaseURL)
    try:
        addUser(a, ALICE, "wonderland")
        clocks = [Clocked(a), Clocked(b)]
        a.limits.keepDeletedDays, b.limits.keepDeletedDays = 0, 3
        deliver(a, [ALICE], message(1))
        resultOf(b.sessions.flush())
        resultOf(a.sessions.otherSettings())
        popDelete(a, ALICE, "wonderland", 1)
        clocks[0].now += SETTINGS_COUNT_FOR - 1
        assert resultOf(a.purgeDeleted()) == 0
        clocks[0].now += 2
        assert resultOf(a.purgeDeleted()) == 1
    finally:
        a.close()
        b.close()


def test_aNodeWarnsOnceWhenTheOthersSettingsDiffer(databaseURL):
    """
    The registry service compares the settings the other live nodes
    announce with its node's and warns when what differs changes (not at
    every comparison), naming the option, both values and the node; and
    says so when they are the same again.  Its metrics say which setting
    differs meanwhile (mailgate_node_settings_differ), for an alert.
    """
    from twisted.logger import formatEvent

    from mailgate.metrics import Metrics

    def differing():
        return {
            labels["setting"]
            for labels, value in samples(metrics, "mailgate_node_settings_differ")
            if value == 1
        }

    a, b = memoryStore(databaseURL), memoryStore(databaseURL)
    metrics = Metrics()
    assert differing() == set()
    service, reactor, events = loggedRegistryService(a, metrics=metrics)
    try:
        a.limits.quotaOctets = 1 << 30
        b.limits.quotaOctets = 1 << 30
        b.limits.expireDays = 30
        resultOf(b.sessions.flush())
        service.startService()
        reactor.run()
        reactor.advance(0)
        [warning] = [e for e in events if e.get("event") == "node.settings_differ"]
        assert warning["differences"] == [
            {"option": "--expire-days", "here": -1, "node": b.sessions.name, "there": 30}
        ]
        assert "--expire-days never here, 30 on " + b.sessions.name in formatEvent(warning)
        assert differing() == {"expire_days"}
        for _ in range(3):
            reactor.advance(service.compareInterval)
            resultOf(b.sessions.flush())
        assert len([e for e in events if e.get("event") == "node.settings_differ"]) == 1
        b.limits.expireDays = None
        resultOf(b.sessions.flush())
        reactor.advance(service.compareInterval)
        assert [e["event"] for e in events if e.get("event", "").startswith("node.")] == [
            "node.settings_differ",
            "node.settings_same",
        ]
        assert differing() == set()
    finally:
        resultOf(service.stopService())
        a.close()
        b.close()


def loggedRegistryService(store, **options):
    """
    The registry service of node "node-a" on C{store}, on a memory reactor
    the test drives, its log events kept: C{(service, reactor, events)}.
    """
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import Logger

    from mailgate.store.housekeeping import RegistryService

    reactor = MemoryReactorClock()
    events = []
    service = RegistryService(store, reactor, name="node-a", **options)
    service.log = Logger(observer=events.append)
    return service, reactor, events


def test_nodesDifferingInRecipientDelimiterOrQuotaWarningsSaySo(databaseURL):
    """
    A node without --recipient-delimiter bounces the mail for bob+lists@
    that one with it gives bob, and nodes with other --quota-warning
    percentages warn users apart: both are announced and compared.
    """
    from twisted.logger import formatEvent

    a, b = memoryStore(databaseURL), memoryStore(databaseURL)
    service, reactor, events = loggedRegistryService(a, recipientDelimiter="+")
    try:
        a.limits.quotaWarnings = (80, 95)
        resultOf(b.sessions.flush())
        service.startService()
        reactor.run()
        reactor.advance(0)
        [warning] = [e for e in events if e.get("event") == "node.settings_differ"]
        assert warning["differences"] == [
            {"option": "--quota-warning", "here": [80, 95], "node": b.sessions.name, "there": []},
            {"option": "--recipient-delimiter", "here": "+", "node": b.sessions.name, "there": ""},
        ]
        text = formatEvent(warning)
        assert f"--quota-warning 80,95 here, none on {b.sessions.name}" in text
        assert f"--recipient-delimiter + here, none on {b.sessions.name}" in text
    finally:
        resultOf(service.stopService())
        a.close()
        b.close()


def samples(metrics, name):
    """
    The samples of the metric family C{name}: C{(labels, value)}.
    """
    return [
        (sample.labels, sample.value)
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    ]


def test_keptDeletedMailIsPurgedInTime(store):
    clock = Clocked(store)
    store.limits.keepDeletedDays = 2
    body = message(1)
    deliver(store, [ALICE, BOB], body)
    deliver(store, [ALICE], message(2))
    popDelete(store, ALICE, "wonderland", 1, 2)
    assert bodyCount(store) == (2, 2)
    clock.days(1)
    assert resultOf(store.purgeDeleted()) == 0
    clock.days(1.5)
    assert resultOf(store.purgeDeleted()) == 2
    assert resultOf(store.listDeleted(ALICE)) == []
    # Bob's copy keeps the shared body; Alice's own body is gone.
    assert bodyCount(store) == (1, 1)
    assert resultOf(store.restoreDeleted(ALICE)) == ([], [])
    session = POP3Session(store)
    session.login(BOB, "builder")
    assert session.command("RETR 1").endswith(body.decode() + ".\r\n")


def test_withoutKeepingDeletedMailIsRemovedAtOnce(store):
    deliver(store, [ALICE], message(1))
    popDelete(store, ALICE, "wonderland", 1)
    assert resultOf(store.listDeleted(ALICE)) == []
    assert bodyCount(store) == (0, 0)


def test_deletingAUserDropsTheirKeptMail(store):
    store.limits.keepDeletedDays = 5
    deliver(store, [ALICE], message(1))
    popDelete(store, ALICE, "wonderland", 1)
    resultOf(store.deleteUser(ALICE))
    assert bodyCount(store) == (0, 0)
    from test_store import query

    assert query(store, "SELECT count(*) FROM deleted_mail") == [(0,)]


# -- renaming -------------------------------------------------------------------------------


def test_renameKeepsTheMaildropItsIdsAndQuota(store):
    ids = [deliver(store, [ALICE], message(n))[ALICE] for n in range(3)]
    resultOf(store.setQuota(ALICE, 5000, messages=10))
    resultOf(store.setExpire(ALICE, 9))
    resultOf(store.renameUser(ALICE, CAROL))
    assert resultOf(store.findUser(ALICE)) is None
    assert [m.uniqueId for m in resultOf(store.listMessages(CAROL))] == ids
    status = resultOf(store.quotaOf(CAROL))
    assert (status.quotaOctets, status.quotaMessages, status.usedMessages) == (5000, 10, 3)
    assert users(store)[CAROL].expireDays == 9
    assert uidlOf(store, CAROL, "wonderland") == ids
    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith("-ERR [AUTH]")
    # Mail for the old address is refused; for the new one delivered.
    assert isinstance(resultOf(store.deliver([ALICE], spoolBytes(message(9))))[ALICE], NoSuchUser)
    assert isinstance(deliver(store, [CAROL], message(9))[CAROL], str)


def test_renameRefusals(store):
    from mailgate.errors import MaildropInUse, UserExists

    assert failureOf(store.renameUser(ALICE, BOB)).check(UserExists)
    assert failureOf(store.renameUser(CAROL, "dave@example.org")).check(NoSuchUser)
    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    assert failureOf(store.renameUser(ALICE, CAROL)).check(MaildropInUse)
    session.command("QUIT")
    resultOf(store.renameUser(ALICE, CAROL))


def test_renameIsRefusedWhileAnotherProcessServesTheUser(databaseURL, store):
    """
    The admin command is another process: it sees the server's sessions
    in the registry (and, on PostgreSQL, the maildrop lock itself).
    """
    from mailgate.errors import MaildropInUse

    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    resultOf(store.sessions.flush())
    admin = memoryStore(databaseURL)
    try:
        assert failureOf(admin.renameUser(ALICE, CAROL)).check(MaildropInUse)
        assert failureOf(admin.expungeMessages(ALICE)).check(MaildropInUse)
        session.command("QUIT")
        resultOf(store.sessions.flush())
        resultOf(admin.renameUser(ALICE, CAROL))
    finally:
        admin.close()


def test_aRememberedPasswordDoesNotLogInUnderTheOldName(databaseURL, store):
    """
    A running server remembers verified passwords (the auth cache): after
    a rename made elsewhere, the old name with that password must fail
    at once, and the new one work.
    """
    from mailgate.testing import pop3Factory

    from twisted.internet.task import Clock

    clock = Clock()
    factory = pop3Factory(store, clock)
    session = POP3Session(store, clock=clock, factory=factory)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    session.command("QUIT")
    assert len(factory.portal.passwordChecker.cache) == 1
    admin = memoryStore(databaseURL)
    try:
        resultOf(admin.renameUser(ALICE, CAROL))
    finally:
        admin.close()
    session = POP3Session(store, clock=clock, factory=factory)
    assert session.login(ALICE, "wonderland").startswith("-ERR [AUTH]")
    # ... and the stale memory is forgotten.
    assert len(factory.portal.passwordChecker.cache) == 0
    session = POP3Session(store, clock=clock, factory=factory)
    assert session.login(CAROL, "wonderland").startswith("+OK")


# -- expunging by the administrator ------------------------------------------------------------


def test_expungeOlderThanAndAll(store):
    clock = Clocked(store)
    deliver(store, [ALICE], message(1))
    clock.days(10)
    kept = deliver(store, [ALICE], message(2))[ALICE]
    clock.days(1)
    assert resultOf(store.expungeMessages(ALICE, 5)) == (1, 0)
    assert [m.uniqueId for m in resultOf(store.listMessages(ALICE))] == [kept]
    assert resultOf(store.expungeMessages(ALICE)) == (1, 0)
    assert usage(store, ALICE) == (0, 0)
    assert bodyCount(store) == (0, 0)
    assert failureOf(store.expungeMessages(CAROL)).check(NoSuchUser)


def test_anExpungeCommitsABoundedNumberOfMessagesAtATime(databaseURL, store):
    """
    An administrator's expunge removes a large maildrop a bounded number
    of messages (kept deleted ones included) per transaction, the
    maildrop's lock held throughout: between two of them another process
    delivers (on SQLite, whose one write lock a single transaction held
    for the whole maildrop: 100,000 messages kept every delivery to every
    user waiting some 6-10 s, a larger maildrop past the busy timeout).
    What is delivered meanwhile is not the expunge's; each transaction's
    removals are told as they commit.
    """
    store.limits.keepDeletedDays = 30
    for n in range(5):
        deliver(store, [ALICE], message(n))
    popDelete(store, ALICE, "wonderland", 1, 2)
    other = memoryStore(databaseURL)
    progress = []
    meanwhile = []

    def committed(removed, kept):
        progress.append((removed, kept))
        meanwhile.append(deliver(other, [ALICE, BOB], message(10 + len(progress)))[ALICE])

    try:
        assert resultOf(store.expungeMessages(ALICE, perTransaction=2, progress=committed)) == (3, 2)
    finally:
        other.close()
    assert progress == [(2, 0), (3, 1), (3, 2)]
    assert [m.uniqueId for m in resultOf(store.listMessages(ALICE))] == meanwhile
    assert resultOf(store.listDeleted(ALICE)) == []
    assert len(resultOf(store.listMessages(BOB))) == 3
    assert usage(store, ALICE) == (3, sum(len(message(10 + n)) for n in (1, 2, 3)))


def test_aUserDeletionEmptiesTheMaildropABoundedNumberAtATime(databaseURL, store):
    """
    Deleting a user with a large maildrop removes their messages (kept
    deleted ones too) a bounded number per transaction, as an expunge
    does, then the user: one transaction for all held SQLite's one write
    lock 3.6 s for 100,000 messages, a delivery to another user waiting
    3.2 s.  What is delivered to the user meanwhile goes with them.
    """
    store.limits.keepDeletedDays = 30
    for n in range(5):
        deliver(store, [ALICE, BOB], message(n))
    popDelete(store, ALICE, "wonderland", 1)
    other = memoryStore(databaseURL)
    progress = []

    def committed(removed, kept):
        progress.append((removed, kept))
        deliver(other, [ALICE, BOB], message(10 + len(progress)))

    try:
        resultOf(store.deleteUser(ALICE, perTransaction=2, progress=committed))
    finally:
        other.close()
    assert progress == [(2, 0), (4, 0), (4, 1)]
    assert resultOf(store.findUser(ALICE)) is None
    assert len(resultOf(store.listMessages(BOB))) == 8
    # Only Bob's messages hold bodies now.
    assert bodyCount(store)[0] == 8


def test_expungeRemovesTheMailKeptForRecoveryToo(store):
    """
    An administrator expunging a user's mail (an erasure request) erases
    what POP3 deleted and recovery keeps as well: older than the days
    given, or all of it; other users' kept mail stays.
    """
    clock = Clocked(store)
    store.limits.keepDeletedDays = 30
    deliver(store, [ALICE, BOB], message(1))
    clock.days(10)
    deliver(store, [ALICE], message(2))
    deliver(store, [ALICE], message(3))
    popDelete(store, ALICE, "wonderland", 1, 2)
    popDelete(store, BOB, "builder", 1)
    clock.days(1)
    assert resultOf(store.expungeMessages(ALICE, 5)) == (0, 1)
    [left] = resultOf(store.listDeleted(ALICE))
    assert left.size == len(message(2))
    assert resultOf(store.expungeMessages(ALICE)) == (1, 1)
    assert resultOf(store.listDeleted(ALICE)) == []
    assert resultOf(store.restoreDeleted(ALICE)) == ([], [])
    assert len(resultOf(store.listDeleted(BOB))) == 1
    # Bob's kept copy of the first message holds its body; nothing else.
    assert bodyCount(store)[0] == 1


# -- the session registry: who and kick --------------------------------------------------------


def test_whoShowsSessionsOfLiveNodesOnly(databaseURL, store):
    from mailgate.store.registry import STALE_AFTER
    from twisted.internet.address import IPv4Address

    clock = Clocked(store)
    store.sessions.name = "node-a"
    session = POP3Session(store, peer=IPv4Address("TCP", "127.0.0.2", 50123))
    assert session.login(ALICE, "wonderland").startswith("+OK")
    assert resultOf(store.listSessions()) == []  # not written yet
    resultOf(store.sessions.flush())
    admin = memoryStore(databaseURL)
    try:
        Clocked(admin, T0 + 5)
        [info] = resultOf(admin.listSessions())
        assert (info.address, info.node, info.peer, info.since) == (ALICE, "node-a", "127.0.0.2:50123", T0)
        # The node stops beating (killed): its sessions are no longer shown.
        Clocked(admin, T0 + STALE_AFTER + 1)
        assert resultOf(admin.listSessions()) == []
        # A node that goes on beating keeps them shown.
        clock.now = T0 + STALE_AFTER
        resultOf(store.sessions.flush())
        assert len(resultOf(admin.listSessions())) == 1
        # Logout: gone at the next write.
        session.command("QUIT")
        resultOf(store.sessions.flush())
        assert resultOf(admin.listSessions()) == []
    finally:
        admin.close()


def test_kickEndsTheSessionWithoutItsDeletions(databaseURL, store, logEvents):
    deliver(store, [ALICE], message(1))
    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    assert session.command("DELE 1").startswith("+OK")
    resultOf(store.sessions.flush())
    admin = memoryStore(databaseURL)
    try:
        assert resultOf(admin.kickSessions(BOB)) == 0
        assert resultOf(admin.kickSessions(ALICE)) == 1
    finally:
        admin.close()
    # The node finds the mark and ends the session: no UPDATE state; its
    # logout says why.
    assert resultOf(store.sessions.poll()) == 1
    assert session.disconnected
    assert session.transport.value().decode().startswith("-ERR [SYS/TEMP] session ended by the administrator")
    [logout] = named(logEvents, "pop3.logout")
    assert (logout["reason"], logout["user"], logout["deleted"]) == ("kicked by the administrator", ALICE, 0)
    resultOf(store.sessions.flush())
    assert resultOf(store.listSessions()) == []
    # The lock is free and nothing was deleted.
    again = POP3Session(store)
    assert again.login(ALICE, "wonderland").startswith(f"+OK {ALICE} has 1 messages")


def test_aKickWaitsForTheCommandUnderWay(store, logEvents):
    """
    A kick arriving while a command waits on the store ends the session
    once that command has answered (as the shutdown's grace does), so the
    client never sees half a reply.
    """
    from twisted.internet import defer

    deliver(store, [ALICE], message(1))
    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    assert session.command("DELE 1").startswith("+OK")
    maildrop = session.protocol._maildrop
    pending = defer.Deferred()
    uniqueIds = maildrop.uniqueIds
    maildrop.uniqueIds = lambda first, count: pending.addCallback(lambda _: uniqueIds(first, count))
    assert session.command("UIDL 1") == "-ERR message 1 is deleted\r\n"
    assert session.command("RSET").startswith("+OK")
    assert session.command("UIDL 1") == ""
    # Kicked while UIDL waits: nothing yet.
    [registered] = store.sessions.local.values()
    registered.end()
    assert session.transport.value() == b"" and not session.disconnected
    pending.callback(None)
    reply = session.advance(0).decode()
    assert reply.startswith("+OK 1 ")
    assert reply.endswith("-ERR [SYS/TEMP] session ended by the administrator\r\n")
    assert session.disconnected
    [logout] = named(logEvents, "pop3.logout")
    assert logout["reason"] == "kicked by the administrator"
    again = POP3Session(store)
    assert again.login(ALICE, "wonderland").startswith(f"+OK {ALICE} has 1 messages")


def test_registryServiceWritesAndKicks(store):
    from twisted.internet.testing import MemoryReactorClock

    from mailgate.store.housekeeping import RegistryService

    reactor = MemoryReactorClock()
    service = RegistryService(store, reactor, name="node-x")
    service.startService()
    assert not reactor.getDelayedCalls()
    reactor.run()
    try:
        session = POP3Session(store)
        assert session.login(ALICE, "wonderland").startswith("+OK")
        reactor.advance(1)
        [info] = resultOf(store.listSessions())
        assert info.node.startswith("node-x[")
        resultOf(store.kickSessions(ALICE))
        reactor.advance(1)
        assert session.disconnected
        reactor.advance(1)
        assert resultOf(store.listSessions()) == []
    finally:
        resultOf(service.stopService())
    from test_store import query

    assert query(store, "SELECT count(*) FROM mailgate_nodes") == [(0,)]


def test_sessionIdsAreUniqueAcrossNodesAndWithinOne(store):
    """
    A session's id in the registry is its node's id and its number there:
    two nodes (two registries over one database) never hand out the same
    one for a user, nor one node twice.
    """
    from mailgate.store.registry import SessionRegistry

    class Maildrop:
        userId = 7

    nodes = [SessionRegistry(store), SessionRegistry(store)]
    ids = [node.started(Maildrop(), "192.0.2.1:1100", None).sessionId for node in nodes for _ in range(3)]
    assert len(set(ids)) == 6
    assert all(i.startswith(nodes[n // 3].nodeId + ".") for n, i in enumerate(ids))


# -- races between the lifecycle's writers (PostgreSQL: several processes) -----


def _whileBlocked(url, work, blocker, meanwhile=None):
    """
    Run C{work()} on a thread until one of its statements waits for a
    lock that C{blocker} (a transaction begun and not yet
    committed, on a connection of its own) holds; then run C{meanwhile()}
    (more of C{blocker}'s statements), if given, commit C{blocker}
    and return C{work}'s result once it has finished (or raise what it
    raised).  The interleaving is forced by PostgreSQL's row locks, not
    by timing.
    """
    import threading
    import time

    import psycopg

    from mailgate.store.postgres import _conninfo

    outcome = []

    def run():
        try:
            outcome.append((True, work()))
        except Exception as e:
            outcome.append((False, e))

    thread = threading.Thread(target=run, daemon=True)
    with psycopg.connect(_conninfo(url), autocommit=True) as watcher:
        thread.start()
        deadline = time.monotonic() + 20
        # Waiting for C{blocker} itself, whatever other tests do meanwhile.
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
        while watcher.execute(waiting, (blocker.info.backend_pid,)).fetchone()[0] == 0:
            assert thread.is_alive() and time.monotonic() < deadline, "the work never waited for the lock"
            time.sleep(0.01)
    if meanwhile is not None:
        meanwhile()
    blocker.commit()
    thread.join(20)
    assert not thread.is_alive() and outcome, "the work did not finish"
    [(finished, result)] = outcome
    if not finished:
        raise result
    return result


def _readable(store, address, password):
    """
    What a POP3 client of C{address} finds: for each message, whether
    RETR gives it (C{+OK}), and the messages STAT counts against the
    octets the quota counts.
    """
    session = POP3Session(store)
    assert session.login(address, password).startswith("+OK")
    count = int(session.command("STAT").split()[1])
    retrieved = [session.command(f"RETR {n}").startswith("+OK") for n in range(1, count + 1)]
    session.command("QUIT")
    return retrieved


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aRestoreRacingThePurgeOfTheSameMessageBringsBackNothingThePurgeRemoved(store, databaseURL):
    """
    C{mailgate mailbox restore} runs while the retention task purges the
    same kept message on another node: the purge commits between the
    restore's reading of the kept rows and its removal of them.  The
    restore then must not put back a message whose body reference the
    purge already let go: with a body shared with Bob, that reference
    was counted once for two copies, and when Bob deleted his, Alice's
    restored copy was left pointing at a body that was gone (RETR -ERR
    for good, its octets in her quota).
    """
    from mailgate.store.retention import _purgeDeleted

    store.limits.keepDeletedDays = 3
    body = message(1)
    deliver(store, [ALICE, BOB], body)
    popDelete(store, ALICE, "wonderland", 1)
    purger = memoryStore(databaseURL)
    try:
        conn = purger.database.connection
        cursor = purger.engine.begin(conn, True)
        assert _purgeDeleted(cursor, 2**40, 500) == 1
        restored, missing = _whileBlocked(
            databaseURL, lambda: resultOf(store.restoreDeleted(ALICE)), conn
        )
    finally:
        purger.close()
    # The purge won: nothing came back.
    assert (restored, missing) == ([], [])
    assert usage(store, ALICE) == (0, 0)
    # Bob deletes his copy for good: the last reference to the body.
    store.limits.keepDeletedDays = 0
    popDelete(store, BOB, "builder", 1)
    assert _readable(store, ALICE, "wonderland") == []
    assert bodyCount(store) == (0, 0)


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_twoRestoresAsNewOfTheSameMessageBringItBackOnce(store, databaseURL):
    """
    Two C{mailgate mailbox restore --as-new} of the same kept message at
    once (two administrators, or a retried command): it comes back once.
    Each used to read the kept row and then insert a copy under a new
    unique id, two maildrop entries sharing one body reference: the
    client downloaded it twice, and deleting one copy released the body
    the other still showed.
    """
    store.limits.keepDeletedDays = 3
    deliver(store, [ALICE], message(1))
    popDelete(store, ALICE, "wonderland", 1)
    other = memoryStore(databaseURL)
    try:
        conn = other.database.connection
        cursor = other.engine.begin(conn, True)
        from mailgate.store.recovery import _restoreDeleted

        first, _ = _restoreDeleted(cursor, ALICE, None, None, True, T0)
        second, _ = _whileBlocked(
            databaseURL, lambda: resultOf(store.restoreDeleted(ALICE, asNew=True)), conn
        )
    finally:
        other.close()
    assert len(first) == 1 and second == []
    assert usage(store, ALICE) == (1, len(message(1)))
    assert _readable(store, ALICE, "wonderland") == [True]


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aRestoreWhileAnExpungeRemovesTheKeptMailIsNoDeadlock(store, databaseURL):
    """
    C{mailgate mailbox restore} while C{mailgate mailbox expunge} (or
    C{user del}) has begun with the user's maildrop: it holds the
    mailbox row and goes on to remove the kept mail.  The
    restore took the kept rows first and the mailbox row last, so each
    waited for the other: PostgreSQL ended the restore with "deadlock
    detected" (found by a stress run of restores, expunges, deliveries
    and POP3 sessions on four stores at once).  Now the restore waits for
    the expunge and then finds nothing left to restore.  Run on a bare
    transaction, without the retries a store makes after a deadlock.
    """
    from mailgate.store.lifecycle import _expungeUser
    from mailgate.store.recovery import _restoreDeleted

    store.limits.keepDeletedDays = 3
    deliver(store, [ALICE], message(1))
    popDelete(store, ALICE, "wonderland", 1)
    userId = resultOf(store.findUser(ALICE)).userId
    expunger = memoryStore(databaseURL)
    restorer = memoryStore(databaseURL)
    try:
        conn = expunger.database.connection
        cursor = expunger.engine.begin(conn, True)
        # How an expunge (and a retention pass) begins.
        cursor.execute("UPDATE mailboxes SET oldest_arrival = oldest_arrival WHERE user_id = ?", (userId,))

        def restore():
            restoring = restorer.engine.begin(restorer.database.connection, True)
            try:
                result = _restoreDeleted(restoring, ALICE, None, None, False, T0)
            except BaseException:
                restorer.engine.rollback(restorer.database.connection)
                raise
            restorer.engine.commit(restorer.database.connection)
            return result

        restored = _whileBlocked(
            databaseURL, restore, conn, meanwhile=lambda: _expungeUser(cursor, ALICE, None, 0)
        )
    finally:
        expunger.close()
        restorer.close()
    assert restored == ([], [])
    assert resultOf(store.listDeleted(ALICE)) == []
    assert usage(store, ALICE) == (0, 0)
    assert bodyCount(store) == (0, 0)


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_theCommandRunsAgainATransactionThatLostADeadlock(store, databaseURL):
    """
    The C{mailgate} command's store (one connection, no worker threads)
    runs again a transaction PostgreSQL ended as a deadlock's victim, as
    a server's store does: it was rolled back whole.  C{mailgate deliver
    alice bob} (which locks Alice's mailbox row, then Bob's) while another
    transaction holds Bob's and then asks for Alice's: the delivery,
    which waited first, is the victim.  It used to exit 75 at once,
    "database unavailable: deadlock detected".
    """
    import psycopg

    bobId = resultOf(store.findUser(BOB)).userId
    aliceId = resultOf(store.findUser(ALICE)).userId
    assert aliceId < bobId
    other = memoryStore(databaseURL)
    try:
        conn = other.database.connection
        cursor = other.engine.begin(conn, True)
        lock = "UPDATE mailboxes SET oldest_arrival = oldest_arrival WHERE user_id = ?"
        cursor.execute(lock, (bobId,))

        def thenAlice():
            try:
                cursor.execute(lock, (aliceId,))
            except psycopg.errors.DeadlockDetected:
                # This one lost instead (its check came first, on a
                # loaded machine): the delivery goes on without a retry.
                conn.rollback()

        delivered = _whileBlocked(databaseURL, lambda: deliver(store, [ALICE, BOB], message(1)), conn, thenAlice)
    finally:
        other.close()
    assert sorted(delivered) == [ALICE, BOB]
    assert usage(store, ALICE) == usage(store, BOB) == (1, len(message(1)))


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
@pytest.mark.parametrize("work", ["recount", "import"])
def test_aUserDeletedWhileARecountOrAnImportWaitsIsNoSuchUser(store, databaseURL, work):
    """
    C{mailgate user recount} (one user, or C{--all} meeting a user deleted
    since it listed them) or an import, while C{mailgate user del} of the
    same user is committing: it found the user, then waited for the
    mailbox row, which was gone once it got it.  It failed with a
    TypeError (exit 70, a traceback, and C{recount --all} stopped there,
    leaving the other users uncounted); now it is L{NoSuchUser}, which
    C{recount --all} passes over.
    """
    from mailgate.store.sql import _deleteUser

    deliver(store, [ALICE], message(1))
    calls = {
        "recount": lambda: resultOf(store.recountUsage(ALICE)),
        "import": lambda: resultOf(store.importMessages(ALICE, [("imported-1", spoolBytes(message(2)), T0)])),
    }
    remover = memoryStore(databaseURL)
    try:
        conn = remover.database.connection
        cursor = remover.engine.begin(conn, True)
        _deleteUser(cursor, ALICE)
        with pytest.raises(NoSuchUser):
            _whileBlocked(databaseURL, calls[work], conn)
    finally:
        remover.close()
    assert ALICE not in users(store)


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aQuitKeepingMailKeepsOnlyWhatItRemoved(store, databaseURL):
    """
    A QUIT where deleted mail is kept, while another transaction removes
    the same message (C{mailgate user del} on another node, which took
    the maildrop's lock after the session's lock connection was lost
    between QUIT's check of the lock and its write; the deletion is run
    here without the lock, to hold it open at the right moment): the
    QUIT keeps only the messages it really took out of the maildrop.  It used to copy the
    message into the kept mail before removing it, so the copy stayed
    although the other transaction had removed the message and let go of
    its body reference; the purge then let go of it a second time, and a
    body shared with Bob vanished under Bob's copy.
    """
    from mailgate.store.sql import _deleteUser

    clock = Clocked(store)
    store.limits.keepDeletedDays = 3
    body = message(1)
    deliver(store, [ALICE, BOB], body)
    maildrop = resultOf(store.openMaildrop(resultOf(store.findUser(ALICE))))
    remover = memoryStore(databaseURL)
    try:
        conn = remover.database.connection
        cursor = remover.engine.begin(conn, True)
        _deleteUser(cursor, ALICE)
        removed = _whileBlocked(databaseURL, lambda: resultOf(maildrop.expunge([0])), conn)
    finally:
        resultOf(maildrop.release())
        remover.close()
    assert removed == 0
    clock.days(4)
    resultOf(store.purgeDeleted())
    assert _readable(store, BOB, "builder") == [True]
    assert bodyCount(store) == (1, 1)


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aUserDeletedWhileAMessageToThemIsBeingCommittedLeavesNothingBehind(store, databaseURL):
    """
    C{mailgate user delete} while a delivery to the user (and Bob) is
    committing on a node: the deletion waits for it and removes the
    message with the rest.  It used to list the maildrop before waiting,
    so the message committed meanwhile stayed behind, a maildrop entry of
    a user who no longer exists holding a reference to the body: its
    storage was never given back, even after Bob deleted his copy.
    """
    from test_store import query

    from mailgate.message import spoolBytes
    from mailgate.store.sql import _deliverOne

    body = message(1, 1000)
    sender = memoryStore(databaseURL)
    try:
        conn = sender.database.connection
        cursor = sender.engine.begin(conn, True)
        delivered = _deliverOne(cursor, sender.engine, [ALICE, BOB], spoolBytes(body), T0)
        assert sorted(delivered) == [ALICE, BOB]
        _whileBlocked(databaseURL, lambda: resultOf(store.deleteUser(ALICE)), conn)
    finally:
        sender.close()
    assert ALICE not in users(store)
    store.limits.keepDeletedDays = 0
    popDelete(store, BOB, "builder", 1)
    assert query(store, "SELECT count(*) FROM maildrop")[0][0] == 0
    assert bodyCount(store) == (0, 0)


def _whileADeliveryCommits(databaseURL, clock, work):
    """
    The result of C{work()} (a store call) run while another connection's
    delivery of a second message to ALICE is committing (its transaction
    open, holding the mailbox row).
    """
    from mailgate.message import spoolBytes
    from mailgate.store.sql import _deliverOne

    sender = memoryStore(databaseURL)
    try:
        conn = sender.database.connection
        cursor = sender.engine.begin(conn, True)
        assert list(_deliverOne(cursor, sender.engine, [ALICE], spoolBytes(message(2)), clock.now)) == [ALICE]
        return _whileBlocked(databaseURL, lambda: resultOf(work()), conn)
    finally:
        sender.close()


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aMessageCommittedWhileRetentionLooksAtItsMaildropStillExpires(store, databaseURL):
    """
    The retention task looks at a maildrop whose old mail the user has
    already deleted, and finds nothing to remove, while a delivery to the
    user is committing: the new message must still expire in its time.
    The task used to write down "no message" as the maildrop's oldest
    arrival (it had counted without the message committing), and a
    maildrop with no oldest arrival is never looked at again: the message
    stayed for good, until some later delivery.
    """
    clock = Clocked(store)
    store.limits.expireDays = 3
    deliver(store, [ALICE], message(1))
    popDelete(store, ALICE, "wonderland", 1)
    clock.days(5)
    assert _whileADeliveryCommits(databaseURL, clock, store.expireMessages) == (0, 0)
    assert len(resultOf(store.listMessages(ALICE))) == 1
    clock.days(4)
    assert resultOf(store.expireMessages()) == (1, 0)
    assert resultOf(store.listMessages(ALICE)) == []


@pytest.mark.parametrize("databaseURL", ["postgres"], indirect=True)
def test_aMessageCommittedWhileAnExpungeLooksAtItsMaildropStillExpires(store, databaseURL):
    """
    As for the retention task: C{mailgate mailbox expunge --older-than}
    that finds nothing to remove while a delivery to the user commits
    must not write "no message" as the maildrop's oldest arrival.
    """
    clock = Clocked(store)
    store.limits.expireDays = 3
    deliver(store, [ALICE], message(1))
    popDelete(store, ALICE, "wonderland", 1)
    clock.days(5)
    assert _whileADeliveryCommits(databaseURL, clock, lambda: store.expungeMessages(ALICE, 3)) == (0, 0)
    assert len(resultOf(store.listMessages(ALICE))) == 1
    clock.days(4)
    assert resultOf(store.expireMessages()) == (1, 0)


def test_everySettingTheNodesCompareHasItsMetricAndItsNodesNote(databaseURL):
    """
    Whatever setting the nodes warn of (node.settings_differ) also sets
    mailgate_node_settings_differ for it: a node with another
    --duplicate-window was warned of in the log while the metric an alert
    watches stayed 0 for every setting.
    """
    from mailgate.metrics import NODE_SETTINGS, Metrics
    from mailgate.store.registry import SHARED_SETTINGS

    assert {option.lstrip("-").replace("-", "_") for option, _ in SHARED_SETTINGS.values()} == set(NODE_SETTINGS)
    a, b = memoryStore(databaseURL), memoryStore(databaseURL)
    metrics = Metrics()
    service, reactor, events = loggedRegistryService(a, metrics=metrics)
    try:
        b.limits.duplicateWindow = 3600
        resultOf(b.sessions.flush())
        service.startService()
        reactor.run()
        reactor.advance(0)
        [warning] = [e for e in events if e.get("event") == "node.settings_differ"]
        assert [d["option"] for d in warning["differences"]] == ["--duplicate-window"]
        assert {
            labels["setting"] for labels, value in samples(metrics, "mailgate_node_settings_differ") if value == 1
        } == {"duplicate_window"}
    finally:
        resultOf(service.stopService())
        a.close()
        b.close()


def test_aRegistryWriteThatCommittedThoughItFailedLeavesNoSessionBehind(databaseURL, store):
    """
    A heartbeat whose COMMIT took effect but whose answer was lost (the
    connection dropped during COMMIT: the write is not run again, it may
    have committed) fails for the node, which writes what it had again.
    That next write went through: it used to insert the sessions again,
    a duplicate key that failed every heartbeat after (the node taken
    for dead, /healthz 503) and to forget a session ended meanwhile, whose
    row stayed in `mailgate who` for as long as the node ran.
    """
    from twisted.internet.address import IPv4Address

    from mailgate.errors import TemporaryFailure

    from twisted.internet import defer

    registry = store.sessions
    written = store.database.runWrite
    answers = []

    def committedButLost(*args, **kwargs):
        resultOf(written(*args, **kwargs))
        answers.append(defer.Deferred())
        return answers[-1]

    alice = POP3Session(store, peer=IPv4Address("TCP", "127.0.0.2", 50123))
    assert alice.login(ALICE, "wonderland").startswith("+OK")
    bob = POP3Session(store, peer=IPv4Address("TCP", "127.0.0.3", 50124))
    assert bob.login(BOB, "builder").startswith("+OK")
    store.database.runWrite = committedButLost
    try:
        failed = registry.flush()
        # Bob leaves while the write is under way.
        bob.command("QUIT")
        answers[0].errback(TemporaryFailure("the connection was lost during COMMIT"))
        resultOf(failed.addErrback(lambda failure: failure.trap(TemporaryFailure)))
    finally:
        del store.database.runWrite
    resultOf(registry.flush())
    assert [info.address for info in resultOf(store.listSessions())] == [ALICE]


def test_aNodeIsNamedByTheProcessItRunsIn(databaseURL, store, monkeypatch):
    """
    A node's name (mailgate who, nodes) carries the id of the process
    serving: twistd makes the service and then, without -n, forks into a
    daemon, and the name carried the id of the process that had exited.
    """
    import os

    service, reactor, _ = loggedRegistryService(store)
    daemon = os.getpid() + 1
    monkeypatch.setattr(os, "getpid", lambda: daemon)
    service.startService()
    try:
        reactor.run()
        reactor.advance(0)
        [node] = resultOf(store.listNodes())
        assert node.name == f"node-a[{daemon}]"
    finally:
        resultOf(service.stopService())
