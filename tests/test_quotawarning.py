"""
Quota warnings (C{--quota-warning PERCENT}): the delivery that brings a
user's use to a warning percentage of the quota puts a message into the
maildrop saying so, once per crossing, as Dovecot's C{quota_warning}
does through a script; the POP3 user sees nothing else of the quota until
mail is refused.  On both backends, through the store, LMTP and SMTP;
and so does a C{mailbox restore} that brings it there.
"""

import email
import smtplib

import pytest

from e2e import DEADLINE, mailgate_cli, mailgate_server, popLogin, sqliteOnly  # noqa: F401 (fixtures)
from mailgate.message import spoolBytes
from mailgate.store.limits import QuotaCrossing, StoreLimits, quotaCrossed, quotaWarningMessage
from mailgate.testing import POP3Session, addUser, deliver, memoryStore, resultOf

ALICE = "alice@example.org"
BOB = "bob@example.org"


@pytest.fixture
def store(databaseURL):
    s = memoryStore(databaseURL)
    addUser(s, ALICE, "wonderland")
    addUser(s, BOB, "builder")
    s.limits.quotaWarnings = (80, 95)
    yield s
    s.close()


def blob(octets):
    """
    A message of exactly C{octets} octets.
    """
    head = b"Subject: filler\r\n\r\n"
    return head + b"x" * (octets - len(head) - 2) + b"\r\n"


def maildrop(store, address=ALICE):
    """
    The user's messages as POP3 serves them, whole.
    """
    session = POP3Session(store)
    password = "wonderland" if address == ALICE else "builder"
    assert session.login(address, password).startswith("+OK")
    count = int(session.command("STAT").split()[1])
    messages = []
    for n in range(1, count + 1):
        reply = session.send(b"RETR %d\r\n" % n)
        messages.append(reply.partition(b"\r\n")[2][: -len(b".\r\n")].replace(b"\r\n..", b"\r\n."))
    session.command("QUIT")
    return messages


def warnings(messages):
    return [email.message_from_bytes(m) for m in messages if b"Auto-Submitted: auto-generated" in m]


def test_eachPercentageIsWarnedOfOnceAsTheUseGoesPastIt(store):
    resultOf(store.setQuota(ALICE, 10_000))
    deliver(store, [ALICE], blob(5_000))  # 50%: nothing
    assert warnings(maildrop(store)) == []
    deliver(store, [ALICE], blob(3_000))  # 80%
    deliver(store, [ALICE], blob(200))  # between the two: nothing more
    messages = maildrop(store)
    [warning] = warnings(messages)
    # After the message that crossed, before the next one.
    assert len(messages) == 4 and b"Auto-Submitted: auto-generated" in messages[2]
    assert warning["Subject"] == "Your mailbox is 80% full"
    assert warning["To"] == f"<{ALICE}>"
    assert warning["From"] == "Mail System <postmaster@example.org>"
    assert warning["Return-Path"] == "<>"
    text = warning.get_payload()
    assert f"Your mailbox {ALICE} now holds 7.8 KB of its 9.8 KB quota (80%)." in text
    status = resultOf(store.quotaOf(ALICE))
    # The warning itself is in the use (it is a message of the maildrop).
    assert status.usedOctets == 8_200 + len(messages[2]) and status.usedMessages == 4
    # 95%, then over: only the 95% crossing is new.
    deliver(store, [ALICE], blob(1_000))
    subjects = [w["Subject"] for w in warnings(maildrop(store))]
    assert subjects == ["Your mailbox is 80% full", "Your mailbox is 95% full"]


def test_eachWarningIsLogged(store, logEvents):
    """
    A quota warning put into a maildrop is logged (C{quota.warned}: the
    user, the percentage, the use and the quota, and which quota): the
    message itself says so to the user alone, and "was alice warned
    before her mail was refused" could be answered only by reading her
    mailbox.  A delivery that warns no one, to a user without a quota or
    short of the next percentage, logs nothing of the kind.
    """
    from twisted.logger import formatEvent

    resultOf(store.setQuota(ALICE, 10_000))
    deliver(store, [ALICE, BOB], blob(5_000))
    deliver(store, [ALICE, BOB], blob(3_000))
    deliver(store, [ALICE], blob(200))
    warned = [e for e in logEvents if e.get("event") == "quota.warned"]
    assert [(e["user"], e["percent"], e["resource"], formatEvent(e)) for e in warned] == [
        (ALICE, 80, "octets", f"quota warned user={ALICE} percent=80 resource=octets used=8000 limit=10000"),
    ]


def test_aDeliveryPastSeveralPercentagesWarnsOfTheHighest(store):
    resultOf(store.setQuota(ALICE, 10_000))
    deliver(store, [ALICE], blob(9_600))
    assert [w["Subject"] for w in warnings(maildrop(store))] == ["Your mailbox is 95% full"]


def test_theQuotaInMessagesIsWarnedOfToo(store):
    resultOf(store.setQuota(ALICE, None, messages=10))
    for n in range(8):
        deliver(store, [ALICE], blob(100 + n))
    [warning] = warnings(maildrop(store))
    assert warning["Subject"] == "Your mailbox is 80% full"
    assert "now holds 8 messages, of the 10 it may hold (80%)" in warning.get_payload()


def test_aWarningAtOneHundredPercentIsStoredOverTheQuota(store):
    """
    The message that fills the mailbox is accepted; the warning that it
    is full goes in although it takes the use past the quota (it is
    small, and the user must be told); the next delivery is refused.
    """
    store.limits.quotaWarnings = (100,)
    resultOf(store.setQuota(ALICE, 5_000))
    deliver(store, [ALICE], blob(5_000))
    [warning] = warnings(maildrop(store))
    assert warning["Subject"] == "Your mailbox is full"
    assert resultOf(store.quotaOf(ALICE)).usedOctets > 5_000
    assert type(resultOf(store.deliver([ALICE], spoolBytes(blob(10))))[ALICE]).__name__ == "QuotaExceeded"


def test_theDefaultQuotaIsWarnedOfAndNoQuotaNever(store):
    store.limits.quotaOctets = 1_000
    deliver(store, [ALICE, BOB], blob(900))
    assert len(warnings(maildrop(store, ALICE))) == 1
    assert len(warnings(maildrop(store, BOB))) == 1
    store.limits.quotaOctets = None
    resultOf(store.setQuota(ALICE, None))
    deliver(store, [ALICE], blob(50_000))
    assert len(warnings(maildrop(store, ALICE))) == 1


def test_withoutWarningsNothingIsAdded(store):
    store.limits.quotaWarnings = ()
    resultOf(store.setQuota(ALICE, 1_000))
    deliver(store, [ALICE], blob(990))
    assert len(maildrop(store)) == 1


def test_deliveriesCommittedTogetherWarnOncePerUser(databaseURL):
    """
    The group commit: deliveries waiting for the same commit run as one; a
    user whose use they take past a percentage between them is warned once.
    """
    from pumped import PumpedReactor
    from test_lifecycle import threadedStore

    setup = memoryStore(databaseURL)
    addUser(setup, ALICE, "wonderland")
    resultOf(setup.setQuota(ALICE, 10_000))
    setup.close()
    reactor = PumpedReactor()
    node = threadedStore(databaseURL, reactor)
    node.limits.quotaWarnings = (80,)
    outcomes = []
    try:
        for _ in range(4):
            node.deliver([ALICE], spoolBytes(blob(2_100))).addBoth(outcomes.append)
        reactor.pump(lambda: len(outcomes) == 4, timeout=60)
    finally:
        node.database.close()
    assert all(isinstance(o[ALICE], str) for o in outcomes), outcomes
    check = memoryStore(databaseURL)
    try:
        messages = maildrop(check)
        assert len(messages) == 5
        assert [w["Subject"] for w in warnings(messages)] == ["Your mailbox is 80% full"]
    finally:
        check.close()


def test_quotaCrossed():
    assert quotaCrossed((80, 95), (0, 7_999, 10_000), (0, 1, -1)) is None
    assert quotaCrossed((80, 95), (0, 8_000, 10_000), (0, 1, -1)) == QuotaCrossing(80, "octets", 8_000, 10_000)
    # Already past it before: not crossed again.
    assert quotaCrossed((80,), (8_000, 9_000, 10_000), (0, 1, -1)) is None
    # The higher of the two quotas' crossings.
    assert quotaCrossed((80, 95), (0, 8_100, 10_000), (18, 19, 20)) == QuotaCrossing(95, "messages", 19, 20)
    assert quotaCrossed((50,), (0, 10, 0), (0, 1, None)) is None


def test_theWarningMessage():
    text = quotaWarningMessage(ALICE, QuotaCrossing(95, "octets", 9_800 << 10, 10 << 20), 1_700_000_000)
    assert b"\r\n" in text and b"\n" not in text.replace(b"\r\n", b"")
    message = email.message_from_bytes(text)
    # A numeric zone, as the Received: field has: "GMT" is RFC 5322's
    # obsolete zone (section 4.3), which a message must not be written with.
    assert message["Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Message-ID"].endswith("@example.org>")
    assert "9.6 MB of its 10 MB quota (95%)" in message.get_payload()
    assert StoreLimits(quotaWarnings=[95, 80, 95]).deliveryQuota() == (-1, -1, (80, 95))


def test_theWarningDoesNotPromiseDaysOfRetries():
    """
    What the warning tells the user of refused mail holds whatever
    --quota-exceeded says: with C{permanent} (and for a message larger
    than the whole quota, always) the sender's server bounces it at once,
    where the text said their servers keep trying for a few days.
    """
    text = quotaWarningMessage(ALICE, QuotaCrossing(80, "octets", 8_000, 10_000), 1_700_000_000)
    body = " ".join(email.message_from_bytes(text).get_payload().split())
    assert (
        "When it is full, new mail for you is refused and returned to the people who sent it, at once or "
        "after their mail servers have tried again for a few days."
    ) in body


# -- through a running server ----------------------------------------------------


@sqliteOnly
def test_lmtpDeliveryPastAPercentageLeavesTheWarningForPOP3(mailgate_server, mailgate_cli):
    mailgate_cli.addUser(ALICE, "wonderland")
    mailgate_cli.check("user", "quota", ALICE, "10K")
    server = mailgate_server("--lmtp", "tcp:0:interface=127.0.0.1", "--quota-warning", "80", "--domain", "example.org")
    lmtp = smtplib.LMTP("127.0.0.1", server.portOf("LMTP"), timeout=DEADLINE)
    try:
        lmtp.ehlo("mta.test")
        assert lmtp.sendmail("sender@remote.test", [ALICE], blob(9_000)) == {}
    finally:
        lmtp.quit()
    client = popLogin(server, ALICE, "wonderland")
    try:
        assert len(client.list()[1]) == 2
        warning = email.message_from_bytes(b"\r\n".join(client.retr(2)[1]))
    finally:
        client.quit()
    assert warning["Subject"] == "Your mailbox is 80% full"


# -- mail brought back by mailbox restore -----------------------------------------


def keptDeleted(store, *sizes):
    """
    Deliver messages of C{sizes} to alice and delete them by POP3, with
    deleted mail kept: their unique ids.
    """
    store.limits.keepDeletedDays = 7
    for size in sizes:
        deliver(store, [ALICE], blob(size))
    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    ids = [line.split()[1] for line in session.command("UIDL").split("\r\n")[1:-2]]
    for n in range(1, len(ids) + 1):
        assert session.command(f"DELE {n}").startswith("+OK")
    assert session.command("QUIT").startswith("+OK")
    assert resultOf(store.quotaOf(ALICE)).usedMessages == 0
    return ids


def test_aRestorePastAPercentageWarnsAsADeliveryDoes(store):
    """
    C{mailbox restore} is never refused for the quota: a restore that
    takes the use past a warning percentage warns of it as a delivery
    would, after the restored messages, and neither the next restore nor
    the next delivery warns again while the use stays past it.  Without
    it, a restore could fill a mailbox and the user's mail was refused
    with no warning ever in the maildrop.
    """
    resultOf(store.setQuota(ALICE, 10_000))
    ids = keptDeleted(store, 3_000, 3_000, 1_000, 500)
    deliver(store, [ALICE], blob(1_000))
    restored, _ = resultOf(store.restoreDeleted(ALICE, [ids[0]]))  # 40%: nothing
    assert [getattr(new, "crossing", None) for _, new in restored] == [None]
    restored, _ = resultOf(store.restoreDeleted(ALICE, [ids[1], ids[2]]))  # 80%
    assert [getattr(new, "crossing", None) for _, new in restored] == [
        None, QuotaCrossing(80, "octets", 8_000, 10_000),
    ]
    messages = maildrop(store)
    [warning] = warnings(messages)
    # After the restored messages, as after the message a delivery warned with.
    assert [b"Auto-Submitted: auto-generated" in m for m in messages] == [False] * 4 + [True]
    assert warning["Subject"] == "Your mailbox is 80% full"
    assert f"Your mailbox {ALICE} now holds 7.8 KB of its 9.8 KB quota (80%)." in warning.get_payload()
    # Still past 80%, short of 95%: warned of nothing more.
    restored, _ = resultOf(store.restoreDeleted(ALICE))
    assert [getattr(new, "crossing", None) for _, new in restored] == [None]
    deliver(store, [ALICE], blob(100))
    assert [w["Subject"] for w in warnings(maildrop(store))] == ["Your mailbox is 80% full"]
    # ... and past 95% is warned of by the delivery, once.
    deliver(store, [ALICE], blob(300))
    assert [w["Subject"] for w in warnings(maildrop(store))] == ["Your mailbox is 80% full", "Your mailbox is 95% full"]


def test_aRestorePastSeveralPercentagesWarnsOfTheHighest(store):
    """
    All of a user's kept mail comes back a few hundred messages per
    transaction: each one that takes the use past percentages warns of
    the highest, as a delivery does, here of the default quota in
    messages.
    """
    store.limits.quotaWarnings = ()
    ids = keptDeleted(store, *[100 + n for n in range(10)])
    store.limits.quotaWarnings = (50, 80, 95)
    store.limits.quotaMessages = 10
    restored, _ = resultOf(store.restoreDeleted(ALICE, perTransaction=3))
    assert [old for old, _ in restored] == ids
    crossings = [(old, new.crossing) for old, new in restored if getattr(new, "crossing", None) is not None]
    # 3 messages; 6, past 50%, and its warning; 10, past 80% and 95%; 12.
    assert crossings == [
        (ids[5], QuotaCrossing(50, "messages", 6, 10)),
        (ids[8], QuotaCrossing(95, "messages", 10, 10)),
    ]
    messages = maildrop(store)
    warned = [b"Auto-Submitted: auto-generated" in m for m in messages]
    assert warned == [False] * 6 + [True] + [False] * 3 + [True, False]
    assert [w["Subject"] for w in warnings(messages)] == ["Your mailbox is 50% full", "Your mailbox is full"]


@sqliteOnly
def test_mailboxRestorePastAPercentageLeavesTheWarningForPOP3(mailgate_server, mailgate_cli, tmp_path):
    """
    The real command against a real server: mail deleted by POP3 and
    kept, restored with the server's configuration file (its
    C{quota-warning}) after new mail came, takes the use past 80%; the command says it warned
    (its exit status and its other lines as without a warning), and the
    POP3 user finds the warning after the restored mail.  Before, the
    restore stored none, and the next delivery was refused (452) with
    the user never warned.
    """
    config = tmp_path / "mailgate.toml"
    config.write_text("quota-warning = [80]\nkeep-deleted-days = 7\n")
    mailgate_cli.addUser(ALICE, "wonderland")
    mailgate_cli.check("user", "quota", ALICE, "10K")
    server = mailgate_server("--config", str(config), "--lmtp", "tcp:0:interface=127.0.0.1", "--domain", "example.org")
    lmtp = smtplib.LMTP("127.0.0.1", server.portOf("LMTP"), timeout=DEADLINE)
    try:
        lmtp.ehlo("mta.test")
        for _ in range(2):
            assert lmtp.sendmail("sender@remote.test", [ALICE], blob(3_500)) == {}  # 71%
        client = popLogin(server, ALICE, "wonderland")
        try:
            ids = [line.split()[1].decode() for line in client.uidl()[1]]
            for n in range(1, len(ids) + 1):
                client.dele(n)
        finally:
            client.quit()
        assert lmtp.sendmail("sender@remote.test", [ALICE], blob(1_500)) == {}
    finally:
        lmtp.quit()
    code, out, err = mailgate_cli("--config", str(config), "mailbox", "restore", ALICE, *ids)
    assert (code, err) == (0, ""), (out, err)
    used = sum(size for _, size, _ in mailgate_cli.mailbox(ALICE)[:3])
    assert out == (
        f"restored {ids[0]}\nrestored {ids[1]}\n2 messages restored to {ALICE}\n"
        f"warned {ALICE}: its mailbox is 80% full ({used} octets of its 10240); "
        "a message saying so follows the restored ones\n"
    )
    client = popLogin(server, ALICE, "wonderland")
    try:
        assert [line.split()[1].decode() for line in client.uidl()[1]][1:3] == ids
        assert len(client.list()[1]) == 4
        warning = email.message_from_bytes(b"\r\n".join(client.top(4, 0)[1]))
    finally:
        client.quit()
    assert warning["Subject"] == "Your mailbox is 80% full"


def test_theAuditLineOfARestoreSaysItWarned(databaseURL, store, tmp_path, monkeypatch):
    """
    Whether a user was warned before her mail was refused is looked up in
    the log: a delivery's warning in the server's (C{quota.warned}), a
    restore's in the command's audit line.
    """
    from mailgate.cli import audit
    from test_cli import CLI

    said = []
    monkeypatch.setattr(audit, "outcome", lambda args, text: said.append(text))
    config = tmp_path / "mailgate.toml"
    config.write_text("quota-warning = [80, 95]\n")
    resultOf(store.setQuota(ALICE, 10_000))
    store.limits.quotaWarnings = ()
    [uniqueId] = keptDeleted(store, 9_500)
    [kept] = resultOf(store.listDeleted(ALICE))
    result = CLI(tmp_path / "unused.sqlite3")(
        "--config", str(config), "mailbox", "restore", ALICE, uniqueId, database=databaseURL
    )
    assert result.code == 0, result
    warned = f"its mailbox is 95% full ({kept.size} octets of its 10000)"
    assert result.out == (
        f"restored {uniqueId}\n1 message restored to {ALICE}\n"
        f"warned {ALICE}: {warned}; a message saying so follows the restored ones\n"
    )
    assert said == [f"1 message restored; warned: {warned}"]
    assert [w["Subject"] for w in warnings(maildrop(store))] == ["Your mailbox is 95% full"]
