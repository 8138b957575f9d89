"""
The lifecycle commands of C{mailgate} (user quota, user expire, mailbox
deleted / restore / expunge, user rename, who, kick), driven through
L{mailgate.cli.run} on both backends, with what the store then holds
checked through the store itself.
"""

import pytest
from twisted.internet import defer

from mailgate.testing import POP3Session, addUser, deliver, memoryStore, resultOf
from test_cli import CLI

ALICE = "alice@example.org"
BOB = "bob@example.org"


@pytest.fixture(autouse=True)
def cheapHashes(cheapCommandHashes, monkeypatch):
    """
    The command hashes the passwords it is given, and those of a user
    import in clear ({PLAIN}), at the suite's cheap scrypt cost
    (conftest's C{cheapCommandHashes}): these tests are about the
    lifecycle commands, not about what a hash costs, and the production
    cost (0.1 s a hash, and as much for each check) was 40 % of this
    module's CPU.  A hash carries its own cost, so every check of it works as with
    a production one.
    """
    import functools

    from mailgate.auth.passwords import importedCredentials
    from mailgate.cli import users
    from mailgate.testing import TEST_HASH_COST

    monkeypatch.setattr(users, "importedCredentials", functools.partial(importedCredentials, logN=TEST_HASH_COST))


@pytest.fixture
def cli(databaseURL, tmp_path):
    c = CLI(tmp_path / "unused.sqlite3")
    c.url = databaseURL
    return c


@pytest.fixture
def store(cli):
    s = memoryStore(cli.url)
    addUser(s, ALICE, "wonderland")
    addUser(s, BOB, "builder")
    yield s
    s.close()


def listed(cli):
    """
    C{mailgate user list} as {address: [columns after the address]}.
    """
    result = cli("user", "list")
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert lines[0].split() == [
        "ADDRESS", "MESSAGES", "OCTETS", "APOP", "QUOTA", "MAX-MSGS", "EXPIRE", "LAST-LOGIN", "NETWORKS", "DISABLED"
    ]
    return {line.split()[0]: line.split()[1:-3] for line in lines[1:]}


# -- user quota ------------------------------------------------------------------


def test_userQuota(cli, store):
    deliver(store, [ALICE], b"Subject: x\r\n\r\nhello\r\n")
    result = cli("user", "quota", ALICE, "500M")
    assert result.code == 0, result
    assert result.out == f"quota of {ALICE}: 500M; in use: 1 message, 21 octets\n"
    assert listed(cli)[ALICE] == ["1", "21", "off", "500M", "default", "default"]
    status = resultOf(store.quotaOf(ALICE))
    assert (status.quotaOctets, status.quotaMessages) == (500 << 20, None)

    result = cli("user", "quota", ALICE, "none", "--messages", "1000")
    assert result.out == f"quota of {ALICE}: none, messages: 1000; in use: 1 message, 21 octets\n"
    assert listed(cli)[ALICE][3:5] == ["none", "1000"]
    result = cli("user", "quota", ALICE, "500", "--messages", "none")
    assert result.out == f"quota of {ALICE}: 500, messages: none; in use: 1 message, 21 octets\n"
    assert cli("user", "quota", ALICE, "default", "--messages", "default").code == 0
    assert listed(cli)[ALICE][3:5] == ["default", "default"]
    assert listed(cli)[BOB] == ["0", "0", "off", "default", "default", "default"]


def test_aCommandThatLeavesTheMailboxFullSaysSo(cli, store):
    """
    A quota set below the use, and a restore that brings the use to the
    quota or past it (restores are never refused), leave a mailbox that
    refuses every new message (452 4.2.2, for days, then a bounce): the
    command says so, on standard error, and still succeeds.  A quota
    with room left, and a user whose limits this command does not know
    (the server's default, without --config), get no such word.
    """
    for n in range(3):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
    full = f"mailgate: warning: {ALICE} is full now ({{}}): new mail to it is refused until messages are removed or its quota is raised\n"

    result = cli("user", "quota", ALICE, "50")
    assert (result.code, result.err) == (0, full.format("63 octets of its 50")), result
    result = cli("user", "quota", ALICE, "none", "--messages", "3")
    assert (result.code, result.err) == (0, full.format("3 messages of its 3")), result
    assert cli("user", "quota", ALICE, "1K", "--messages", "none").err == ""
    assert cli("user", "quota", ALICE, "default", "--messages", "default").err == ""

    ids = keptDeleted(store, ALICE, "wonderland", 1, 2)
    assert cli("user", "quota", ALICE, "50").err == ""
    result = cli("mailbox", "restore", ALICE, ids[0])
    assert result.code == 0, result
    assert result.out == f"restored {ids[0]}\n1 message restored to {ALICE}\n"
    # 42 octets of 50: room left.
    assert result.err == "", result
    result = cli("mailbox", "restore", ALICE)
    assert (result.code, result.err) == (0, full.format("63 octets of its 50")), result


def test_mailboxListSaysWhenTheUserHasNoQuota(cli, store):
    """
    C{mailbox list} ends with the quota that applies: a user whose own
    quota is none has none (not the server's default, which another
    user's own quota of none looked like), and one who goes by the
    default is said to.
    """
    def quotaLine():
        result = cli("mailbox", "list", ALICE)
        assert result.code == 0, result
        return result.out.splitlines()[-1]

    assert quotaLine() == "in use: 0 messages, 0 octets; quota: server default"
    assert cli("user", "quota", ALICE, "none", "--messages", "none").code == 0
    assert quotaLine() == "in use: 0 messages, 0 octets; quota: none"
    assert cli("user", "quota", ALICE, "none", "--messages", "default").code == 0
    assert quotaLine() == "in use: 0 messages, 0 octets; quota: server default"
    assert cli("user", "quota", ALICE, "1K", "--messages", "none").code == 0
    assert quotaLine() == "in use: 0 messages, 0 octets; quota: 1024 octets"


def test_userQuotaRefusesNonsense(cli, store):
    for argv, code in (
        (["user", "quota", ALICE, "lots"], 64),
        (["user", "quota", ALICE, "-5"], 64),
        (["user", "quota", ALICE, "1G", "--messages", "many"], 64),
        (["user", "quota", "nobody@example.org", "1G"], 67),
    ):
        result = cli(*argv)
        assert result.code == code, (argv, result)
        assert result.err.startswith("mailgate: ") and result.err.count("\n") == 1, result
    assert listed(cli)[ALICE][3] == "default"


def test_deliverOverQuotaIsATemporaryFailureAndStoresNothing(cli, store):
    resultOf(store.setQuota(ALICE, 10))
    result = cli("deliver", BOB, ALICE, stdin=b"Subject: x\n\nhello\n")
    assert result.code == 75, result
    assert result.err == f"mailgate: mailbox full: {ALICE}; try again later\n"
    assert resultOf(store.listMessages(BOB)) == []


# -- user expire -------------------------------------------------------------------


def test_userExpire(cli, store):
    result = cli("user", "expire", ALICE, "30")
    assert result.code == 0, result
    assert result.out == f"messages of {ALICE} expire after: 30 days\n"
    assert listed(cli)[ALICE][5] == "30"
    assert cli("user", "expire", ALICE, "never").out == f"messages of {ALICE} expire after: never\n"
    assert listed(cli)[ALICE][5] == "never"
    assert cli("user", "expire", ALICE, "default").code == 0
    assert listed(cli)[ALICE][5] == "default"
    soon = cli("user", "expire", ALICE, "soon")
    assert (soon.code, soon.err) == (64, "mailgate: bad number of days: not a whole number: 'soon'\n")
    negative = cli("user", "expire", ALICE, "-3")
    assert (negative.code, negative.err) == (64, "mailgate: bad number of days: must not be negative\n")
    assert cli("user", "quota", ALICE, "1G", "--messages", "-1").err == (
        "mailgate: bad message count: must not be negative\n"
    )
    assert listed(cli)[ALICE][5] == "default"
    assert cli("user", "expire", "nobody@example.org", "3").code == 67


# -- mailbox deleted / restore ----------------------------------------------------------


def keptDeleted(store, address, password, *numbers):
    from mailgate.testing import POP3Session

    store.limits.keepDeletedDays = 7
    session = POP3Session(store)
    assert session.login(address, password).startswith("+OK")
    ids = [line.split()[1] for line in session.command("UIDL").split("\r\n")[1:-2]]
    for n in numbers:
        assert session.command(f"DELE {n}").startswith("+OK")
    assert session.command("QUIT").startswith("+OK")
    return ids


def test_mailboxDeletedAndRestore(cli, store):
    for n in range(3):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
    ids = keptDeleted(store, ALICE, "wonderland", 1, 3)

    result = cli("mailbox", "deleted", ALICE)
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert lines[0].split() == ["NUMBER", "OCTETS", "UNIQUE-ID", "DELETED", "FROM"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        ("1", "21", ids[0], "127.0.0.1:40000"),
        ("2", "21", ids[2], "127.0.0.1:40000"),
    ]

    result = cli("mailbox", "restore", ALICE, ids[2])
    assert result.code == 0, result
    assert result.out == f"restored {ids[2]}\n1 message restored to {ALICE}\n"
    assert [m.uniqueId for m in resultOf(store.listMessages(ALICE))] == ids[1:]

    result = cli("mailbox", "restore", ALICE, "--as-new")
    assert result.code == 0, result
    new = resultOf(store.listMessages(ALICE))[-1].uniqueId
    assert new not in ids
    assert result.out == f"restored {ids[0]} as {new}\n1 message restored to {ALICE}\n"
    assert cli("mailbox", "deleted", ALICE).out.count("\n") == 1


def test_mailboxRestoreTakesItsOptionsAmongTheUniqueIds(cli, store):
    """
    C{mailbox restore ADDRESS --as-new UIDL}, the option between the
    operands, restores that message: argparse refused the unique ids
    after the option as "unrecognized arguments" (exit 64), where the
    same words with the option last worked.  A missing ADDRESS is named
    alone.
    """
    for n in range(3):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
    ids = keptDeleted(store, ALICE, "wonderland", 1, 2, 3)
    result = cli("mailbox", "restore", ALICE, "--as-new", ids[0], "--since", "1h", ids[2])
    assert result.code == 0, result
    assert result.out.endswith(f"2 messages restored to {ALICE}\n")
    assert [line.split()[1] for line in result.out.splitlines()[:2]] == [ids[0], ids[2]]
    result = cli("mailbox", "restore")
    assert result.code == 64
    assert result.err.endswith("error: the following arguments are required: ADDRESS\n")


def test_mailboxRestoreInterruptedWhileListingSaysAllWereRestored(cli, store, monkeypatch):
    """
    Ctrl-C once the messages are back, while their lines go out (thousands
    of them to a slow terminal): the command said only "interrupted"
    (exit 130) after a part of the list, and its audit line no outcome,
    though every message was restored, and running it again restored
    nothing.  It says how many came back, and the audit line has them.
    """
    import io

    from mailgate.cli import audit, run

    for n in range(3):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
    keptDeleted(store, ALICE, "wonderland", 1, 2, 3)
    outcomes = []
    monkeypatch.setattr(audit, "outcome", lambda args, text: outcomes.append(text))

    class SlowTerminal(io.StringIO):
        def write(self, text):
            if self.getvalue().count("\n") == 1:
                raise KeyboardInterrupt()
            return super().write(text)

    out, err = SlowTerminal(), io.StringIO()
    code = run(["--database", cli.url, "mailbox", "restore", ALICE], stdout=out, stderr=err, environ={})
    assert code == 130
    assert out.getvalue().count("\n") == 1
    assert err.getvalue() == (
        f"mailgate: interrupted while listing them: 3 messages restored to {ALICE}\nmailgate: interrupted\n"
    )
    assert outcomes == ["3 messages restored"]
    assert len(resultOf(store.listMessages(ALICE))) == 3


def test_mailboxRestoreSince(cli, store):
    for n in range(2):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
    keptDeleted(store, ALICE, "wonderland", 1, 2)
    # Deleted just now: nothing was deleted since tomorrow, all since an hour ago.
    assert cli("mailbox", "restore", ALICE, "--since", "2999-01-01").out == f"0 messages restored to {ALICE}\n"
    assert cli("mailbox", "restore", ALICE, "--since", "1h").out.endswith(f"2 messages restored to {ALICE}\n")
    assert cli("mailbox", "restore", ALICE, "--since", "yesterday-ish").code == 64


def test_mailboxRestoreUnknownId(cli, store):
    result = cli("mailbox", "restore", ALICE, "nope")
    assert result.code == 65, result
    assert result.err == f"mailgate: not among {ALICE}'s kept deleted messages: nope\n"
    assert cli("mailbox", "deleted", "nobody@example.org").code == 67


def test_mailboxRestoreOfAnIdThatIsNotUTF8(cli, store):
    """
    A unique id whose octets are not UTF-8 (Python's argv gives them as
    lone surrogates) is no kept message's: the others named are restored
    and it is reported like any id not kept, not as an internal error
    from the database driver; given alone, it restores nothing (not
    every kept message, as no id at all would).
    """
    for n in range(2):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
    ids = keptDeleted(store, ALICE, "wonderland", 1, 2)
    result = cli("mailbox", "restore", ALICE, "\udcff\udcfe")
    assert (result.code, result.out) == (65, f"0 messages restored to {ALICE}\n"), result
    assert result.err == f"mailgate: not among {ALICE}'s kept deleted messages: \\xff\\xfe\n"
    assert len(resultOf(store.listDeleted(ALICE))) == 2

    result = cli("mailbox", "restore", ALICE, ids[1], "x\udcff")
    assert result.code == 65, result
    assert result.out == f"restored {ids[1]}\n1 message restored to {ALICE}\n"
    assert result.err == f"mailgate: not among {ALICE}'s kept deleted messages: x\\xff\n"
    assert cli("mailbox", "restore", "nobody@example.org", "\udcff").code == 67


# -- user rename, mailbox expunge, who, kick --------------------------------------------


def test_userRename(cli, store):
    uid = deliver(store, [ALICE], b"Subject: x\r\n\r\nhello\r\n")[ALICE]
    result = cli("user", "rename", ALICE, "Alice.New@Example.org")
    assert result.code == 0, result
    assert result.out == f"renamed {ALICE} to alice.new@example.org; the maildrop, its unique ids and quota follow\n"
    assert [m.uniqueId for m in resultOf(store.listMessages("alice.new@example.org"))] == [uid]
    assert cli("user", "rename", ALICE, "x@example.org").code == 67
    assert cli("user", "rename", "alice.new@example.org", BOB).code == 73


def test_userRenameRefusedInSession(cli, store):
    from mailgate.testing import POP3Session

    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    resultOf(store.sessions.flush())
    result = cli("user", "rename", ALICE, "x@example.org")
    assert result.code == 75, result
    assert result.err == (
        f"mailgate: {ALICE} is in a POP3 session; try again once it ended (or end it: mailgate kick {ALICE})\n"
    )
    result = cli("mailbox", "expunge", ALICE, "--all")
    assert result.code == 75, result
    assert result.err.startswith(f"mailgate: {ALICE} is in a POP3 session; try again once it ended")
    # Deleting the user would leave the session answering for mail that
    # is gone: refused too, and the session goes on.
    result = cli("user", "del", ALICE)
    assert result.code == 75, result
    assert result.err.startswith(f"mailgate: {ALICE} is in a POP3 session; try again once it ended")
    assert session.command("STAT").startswith("+OK")
    assert session.command("QUIT").startswith("+OK")
    resultOf(store.sessions.flush())
    assert cli("user", "del", ALICE).code == 0


@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
def test_aSessionJustLoggedInIsNotExpungedUnderOnSQLite(cli, store):
    """
    The embedded store's sessions hold their maildrop locks in the
    server's memory, and the registry the admin command also reads is
    written about a second after a login: a C{mailbox expunge} (or
    C{user del}, C{user rename}) in that second went ahead and removed
    the messages the session had just listed (its RETR then failed, and
    its QUIT still counted them).  The server's session lock is seen by
    the command's process through the lock file, as a PostgreSQL node's
    advisory lock is.
    """
    server = memoryStore(cli.url)
    server.engine.claimServer()
    try:
        deliver(server, [ALICE], b"Subject: x\r\n\r\nhello\r\n")
        session = POP3Session(server)
        assert session.login(ALICE, "wonderland").startswith("+OK")
        # Nothing written to the registry yet: the lock alone refuses.
        for argv in (
            ["mailbox", "expunge", ALICE, "--all"],
            ["user", "del", ALICE],
            ["user", "rename", ALICE, "carol@example.org"],
        ):
            result = cli(*argv)
            assert result.code == 75, (argv, result)
            assert result.err.startswith(f"mailgate: {ALICE} is in a POP3 session"), result
        assert session.command("RETR 1").startswith("+OK")
        assert session.command("QUIT").startswith("+OK")
        # The session's lock was given back at its end.
        assert cli("mailbox", "expunge", ALICE, "--all").out == (
            f"removed 1 message (every message) from {ALICE}\n"
        )
    finally:
        server.close()


def test_mailboxExpungeSaysWhatItRemovedOfTheKeptMail(cli, store):
    for n in range(3):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
    keptDeleted(store, ALICE, "wonderland", 1)
    result = cli("mailbox", "expunge", ALICE, "--all")
    assert (result.code, result.out) == (
        0,
        f"removed 2 messages (every message) from {ALICE}\n"
        "removed 1 deleted message kept for recovery (every message) too\n",
    )
    assert cli("mailbox", "deleted", ALICE).out.splitlines()[1:] == []


def interruptedAtTheSecondCall(monkeypatch, module, name):
    """
    Make C{module.name} raise C{KeyboardInterrupt} (a Ctrl-C) at its
    second call, after a first that runs as it would: a command stopped
    between two of its transactions.

    @return: a function that puts the original back.
    """
    original = getattr(module, name)
    calls = []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt()
        return original(*args)

    monkeypatch.setattr(module, name, interrupted)
    return lambda: monkeypatch.setattr(module, name, original)


def test_anExpungeInterruptedHalfWaySaysWhatItRemoved(cli, store, monkeypatch):
    """
    An expunge is committed a few hundred messages at a time: stopped
    half-way (Ctrl-C), what its committed transactions removed is gone,
    and said, with what to do; run again, it removes the rest.
    """
    from mailgate.store import lifecycle

    for n in range(3):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
    monkeypatch.setattr(lifecycle, "EXPUNGE_PER_TRANSACTION", 1)
    putBack = interruptedAtTheSecondCall(monkeypatch, lifecycle, "removeMessages")
    result = cli("mailbox", "expunge", ALICE, "--all")
    assert (result.code, result.out) == (130, "")
    assert result.err == (
        f"mailgate: stopped after removing 1 message and 0 kept deleted messages (every message) from {ALICE}; "
        "the rest is still there: run the command again to remove it\n"
        "mailgate: interrupted\n"
    )
    assert len(resultOf(store.listMessages(ALICE))) == 2
    putBack()
    result = cli("mailbox", "expunge", ALICE, "--all")
    assert (result.code, result.out) == (0, f"removed 2 messages (every message) from {ALICE}\n")
    assert resultOf(store.listMessages(ALICE)) == []


def test_mailboxExpunge(cli, store):
    for n in range(3):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
    result = cli("mailbox", "expunge", ALICE, "--older-than", "1")
    assert (result.code, result.out) == (0, f"removed 0 messages (messages older than 1 day) from {ALICE}\n")
    result = cli("mailbox", "expunge", ALICE, "--all")
    assert (result.code, result.out) == (0, f"removed 3 messages (every message) from {ALICE}\n")
    assert resultOf(store.listMessages(ALICE)) == []
    assert cli("mailbox", "expunge", ALICE).code == 64
    assert cli("mailbox", "expunge", ALICE, "--all", "--older-than", "3").code == 64


def test_whoAndKickWithoutAServingNode(cli, store, monkeypatch):
    from twisted.internet.address import IPv4Address

    from mailgate.cli import sessions as command
    from mailgate.testing import POP3Session

    # Kick gives a session it does not find at once a while to appear
    # (test_kickFindsASessionThatJustLoggedIn); none will here, so only
    # its first look, not 2.5 s of looking again, before saying so.
    monkeypatch.setattr(command, "KICK_LOOK_AGAIN", 0)

    result = cli("who")
    assert result.out.split() == ["USER", "NODE", "CLIENT", "MASTER", "SINCE"]
    store.sessions.name = "node-a"
    session = POP3Session(store, peer=IPv4Address("TCP", "127.0.0.3", 41000))
    assert session.login(ALICE, "wonderland").startswith("+OK")
    resultOf(store.sessions.flush())
    lines = cli("who").out.splitlines()
    # Her own login: no master user.
    assert lines[1].split()[:4] == [ALICE, "node-a", "127.0.0.3:41000", "-"]
    assert cli("kick", BOB).code == 1
    assert cli("kick", "nobody@example.org").code == 67
    # Nobody serves the session here to end it: asked, not ended.
    result = cli("kick", ALICE, "--wait", "0")
    assert result.code == 75
    assert result.err == f"mailgate: asked the node to end the POP3 session of {ALICE}; it has not ended yet\n"


def test_nodesListsTheRunningNodesAndTheirSettings(cli, store):
    """
    C{mailgate nodes}: each node whose heartbeat is recent, with the
    default quota, EXPIRE and kept-deleted days it works with, and which
    of these differ; a node that left is gone from the list.
    """
    import json

    assert cli("nodes").out.split() == [
        "NODE", "STARTED", "QUOTA", "EXPIRE", "KEEP-DELETED", "OVER-QUOTA", "WARN-AT", "DELIMITER", "DUP-WINDOW",
        "CLOCK",
    ]
    other = memoryStore(cli.url)
    try:
        store.sessions.name, other.sessions.name = "node-a[1]", "node-b[2]"
        store.sessions.quotaExceeded, other.sessions.quotaExceeded = "temporary", "permanent"
        store.limits.quotaOctets, store.limits.keepDeletedDays = 1 << 30, 7
        store.limits.quotaWarnings = (95, 80)
        other.sessions.recipientDelimiter = "+"
        other.limits.quotaOctets, other.limits.expireDays = 1 << 30, 30
        other.limits.duplicateWindow = 3600
        resultOf(store.sessions.flush())
        resultOf(other.sessions.flush())
        result = cli("nodes")
        assert result.code == 0, result
        lines = result.out.splitlines()
        assert [line.split()[:1] + line.split()[2:] for line in lines[1:3]] == [
            ["node-a[1]", "1G", "never", "7", "temporary", "80%,95%", "none", "86400", "-"],
            ["node-b[2]", "1G", "30", "0", "permanent", "none", "+", "3600", "-"],
        ]
        assert lines[3:] == [
            "",
            "the nodes differ in --expire-days, --keep-deleted-days, --quota-exceeded, --quota-warning, "
            "--recipient-delimiter, --duplicate-window: give every node the same",
        ]
        records = [json.loads(line) for line in cli("nodes", "--json").out.splitlines()]
        assert [r["clock_offset"] for r in records] == [None, None]
        assert [(r["node"], r["settings"]) for r in records] == [
            (
                "node-a[1]",
                {"quota_octets": 1 << 30, "expire_days": None, "keep_deleted_days": 7, "quota_exceeded": "temporary",
                 "quota_warnings": [80, 95], "recipient_delimiter": "", "duplicate_window": 86400},
            ),
            (
                "node-b[2]",
                {"quota_octets": 1 << 30, "expire_days": 30, "keep_deleted_days": 0, "quota_exceeded": "permanent",
                 "quota_warnings": [], "recipient_delimiter": "+", "duplicate_window": 3600},
            ),
        ]
        assert ("--quota-exceeded", "temporary", "node-b[2]", "permanent") in resultOf(store.sessions.otherSettings())
        resultOf(other.sessions.leave())
        lines = cli("nodes").out.splitlines()
        assert [line.split()[0] for line in lines[1:]] == ["node-a[1]"]
    finally:
        other.close()


def test_nodesShowsHowFarEachNodesClockIsFromTheDatabaseServers(cli, store, databaseURL):
    """
    Each node measures its clock against the PostgreSQL server's when it
    compares settings (every 30 s) and announces the offset with its next
    heartbeat: C{mailgate nodes} shows it (node ahead: positive).  SQLite
    has no clock apart from the one machine's: nothing to show.
    """
    import json
    import time

    from test_lifecycle import Clocked

    store.sessions.name = "node-a[1]"
    clock = Clocked(store, now=time.time() + 62)
    resultOf(store.sessions.otherSettings())
    resultOf(store.sessions.flush())
    [line] = cli("nodes").out.splitlines()[1:]
    [record] = [json.loads(line) for line in cli("nodes", "--json").out.splitlines()]
    assert "clock_offset" not in record["settings"]
    if databaseURL.startswith("sqlite"):
        assert line.split()[-1] == "-"
        assert record["clock_offset"] is None
        return
    assert line.split()[-1] in ("+62.0s", "+61.9s")
    assert 61.5 < record["clock_offset"] <= 62
    # Behind (by less than the 30 s after which the others, and the
    # command, would take it for stopped).
    clock.now = time.time() - 20
    resultOf(store.sessions.otherSettings())
    resultOf(store.sessions.flush())
    assert cli("nodes").out.splitlines()[1].split()[-1] in ("-20.0s", "-20.1s")


def test_userListShowsEachUsersLastLogin(cli, store):
    """
    The start of each user's last POP3 session, written with the node's
    registry heartbeat (a login costs no write of its own), sessions that
    began and ended between two heartbeats included (most do), never
    moved back by a session that started earlier; "never" for a user who
    has not logged in.
    """
    import json

    from test_lifecycle import Clocked

    clock = Clocked(store, now=1_700_000_000)
    session = POP3Session(store)
    assert session.login(ALICE, "wonderland").startswith("+OK")
    clock.now += 3600
    later = POP3Session(store)
    assert later.command("QUIT").startswith("+OK")
    resultOf(store.sessions.flush())
    lines = {line.split()[0]: line.split()[-3] for line in cli("user", "list").out.splitlines()[1:]}
    assert lines == {ALICE: "2023-11-14T22:13:20Z", BOB: "never"}
    # An older session written after a newer login moves nothing back.
    session.command("QUIT")
    other = POP3Session(store)
    assert other.login(ALICE, "wonderland").startswith("+OK")
    other.command("QUIT")
    clock.now -= 7200
    old = POP3Session(store)
    assert old.login(ALICE, "wonderland").startswith("+OK")
    old.command("QUIT")
    resultOf(store.sessions.flush())
    records = {r["address"]: r["last_login"] for r in map(json.loads, cli("user", "list", "--json").out.splitlines())}
    assert records == {ALICE: "2023-11-14T23:13:20Z", BOB: None}
    # A node that stops writes the logins its last second saw.
    clock.now += 7200 + 60
    bob = POP3Session(store)
    assert bob.login(BOB, "builder").startswith("+OK")
    bob.command("QUIT")
    resultOf(store.sessions.leave())
    assert cli("user", "list").out.splitlines()[2].split()[-3] == "2023-11-14T23:14:20Z"


def test_importForget(cli, store):
    """
    C{mailgate import forget ADDRESS [UIDL ...]}: says how many of the
    user's remembered imported ids it forgot; an unknown user is refused.
    """
    import time

    from mailgate.message import spoolBytes

    items = [(f"U{n}", spoolBytes(b"Subject: %d\r\n\r\nx\r\n" % n), int(time.time())) for n in range(3)]
    imported, _, _ = resultOf(store.importMessages(ALICE, items))
    assert len(imported) == 3
    result = cli("import", "forget", ALICE, "U0", "U9")
    assert (result.code, result.out) == (
        0,
        f"forgot 1 imported unique ids of {ALICE} (of 2 given); the next import brings in again "
        "those the maildrop no longer holds\n",
    )
    result = cli("import", "forget", ALICE)
    assert result.code == 0 and result.out.startswith(f"forgot 2 imported unique ids of {ALICE};"), result
    assert cli("import", "forget", "nobody@example.org").code == 67


def test_kickFindsASessionThatJustLoggedIn(cli, store, monkeypatch):
    """
    A session appears in the registry with its node's next write, about a
    second after its login: kick looks again for a little while, and
    finds it.
    """
    from mailgate.cli import sessions as command
    from mailgate.testing import POP3Session

    session = POP3Session(store)
    assert session.login(BOB, "builder").startswith("+OK")
    waited = []

    def sleep(seconds):
        # The node writes its sessions while kick waits.
        waited.append(seconds)
        resultOf(store.sessions.flush())

    monkeypatch.setattr(command.time, "sleep", sleep)
    result = cli("kick", BOB, "--wait", "0")
    assert waited
    assert result.err == f"mailgate: asked the node to end the POP3 session of {BOB}; it has not ended yet\n"


def test_kickEndsWhenItsSessionDidThoughTheClientIsBack(cli, store, monkeypatch):
    """
    A mail client that is kicked out often logs in again at once: kick
    waits for the session it marked to end, not for the user to have no
    session at all, and says it ended it (before, it waited out --wait
    and failed with 75, "it has not ended yet", and the client's new
    session looked like the one it had failed to end).
    """
    from mailgate.cli import sessions as command
    from mailgate.testing import POP3Session

    kicked = POP3Session(store)
    assert kicked.login(BOB, "builder").startswith("+OK")
    resultOf(store.sessions.flush())
    sleep = command.time.sleep
    back = []

    def nodeTurns(seconds):
        if not back:
            # The node ends the marked session; the client logs in again.
            assert resultOf(store.sessions.poll()) == 1
            assert kicked.disconnected
            back.append(POP3Session(store))
            assert back[0].login(BOB, "builder").startswith("+OK")
            resultOf(store.sessions.flush())
        sleep(seconds)

    monkeypatch.setattr(command.time, "sleep", nodeTurns)
    result = cli("kick", BOB, "--wait", "3")
    expected = (
        f"the POP3 session of {BOB} has ended; nothing it marked deleted was removed, "
        "unless it sent QUIT before its node saw the kick\n"
    )
    assert (result.code, result.out) == (0, expected), result
    assert back
    # The new session is left alone.
    assert len(resultOf(store.listSessions(BOB))) == 1
    assert resultOf(store.sessions.poll()) == 0
    assert back[0].command("STAT").startswith("+OK")


# -- numbers out of range -----------------------------------------------------------------

HUGE = "99999999999999999999"


OUT_OF_RANGE = [
        ["user", "quota", ALICE, HUGE + "T"],
        ["user", "quota", ALICE, "8388608T"],
        ["user", "quota", ALICE, "9223372036854775808"],
        ["user", "quota", ALICE, "1025T"],
        ["user", "quota", ALICE, "1G", "--messages", HUGE],
        ["user", "expire", ALICE, HUGE],
        ["user", "expire", ALICE, "36501"],
        ["mailbox", "expunge", ALICE, "--older-than", HUGE],
        ["mailbox", "restore", ALICE, "--since", HUGE + "999d"],
        ["mailbox", "restore", ALICE, "--since", "36501d"],
]


def test_numbersTooLargeForTheDatabaseAreUsageErrors(cli, store):
    """
    Larger than the database's 64-bit integers (or than any sane limit):
    a usage error saying so, not "internal error: OverflowError"; nothing
    changes.  The largest values are taken.
    """
    deliver(store, [ALICE], b"Subject: x\r\n\r\nhello\r\n")
    keptDeleted(store, ALICE, "wonderland", 1)
    deliver(store, [ALICE], b"Subject: y\r\n\r\nhello\r\n")
    for argv in OUT_OF_RANGE:
        result = cli(*argv)
        assert result.code == 64, (argv, result)
        assert result.err.startswith("mailgate: bad ") and result.err.count("\n") == 1, result
    assert listed(cli)[ALICE][3:] == ["default", "default", "default"]
    assert len(resultOf(store.listMessages(ALICE))) == 1
    assert len(resultOf(store.listDeleted(ALICE))) == 1

    assert cli("user", "quota", ALICE, "1024T", "--messages", str(10**12)).code == 0
    assert cli("user", "expire", ALICE, "36500").code == 0
    assert listed(cli)[ALICE][3:] == ["1024T", str(10**12), "36500"]
    deliver(store, [ALICE], b"Subject: x\r\n\r\nhello\r\n")
    assert cli("mailbox", "expunge", ALICE, "--older-than", "36500").out.startswith("removed 0 messages")


def test_expungeRefusesANegativeAge(cli, store):
    """
    --older-than -5 meant "arrived before five days from now": every
    message, one delivered a second ago too.
    """
    deliver(store, [ALICE], b"Subject: x\r\n\r\nhello\r\n")
    result = cli("mailbox", "expunge", ALICE, "--older-than", "-5")
    assert result.code == 64, result
    assert result.err == "mailgate: bad --older-than: must not be negative\n"
    assert cli("mailbox", "expunge", ALICE, "--older-than", "soon").code == 64
    assert len(resultOf(store.listMessages(ALICE))) == 1


def test_userExpireZeroIsRefused(cli, store):
    """
    Not "no limit", as 0 is for most of mailgate's limits: 0 days would
    have the retention task remove all of the user's mail, read or not,
    within ten minutes.  Nothing changes; never keeps mail.
    """
    zero = cli("user", "expire", ALICE, "0")
    assert (zero.code, zero.out) == (64, ""), zero
    assert zero.err == (
        "mailgate: bad number of days: must be at least 1, not 0: 0 days would remove every "
        "message at the next retention pass; never keeps mail\n"
    )
    assert listed(cli)[ALICE][5] == "default"


@pytest.mark.parametrize(
    "argv, what",
    [
        (["0"], "size"),
        (["0K"], "size"),
        (["1M", "--messages", "0"], "message count"),
        (["none", "--messages", "0"], "message count"),
    ],
)
def test_userQuotaZeroIsRefused(cli, store, argv, what):
    """
    Not "no limit", as Dovecot reads a quota of 0: a mailbox that refuses
    every message, a temporary failure for ever (the MTA retries for days,
    then bounces).  Nothing changes; none is no limit.
    """
    zero = cli("user", "quota", ALICE, *argv)
    assert (zero.code, zero.out) == (64, ""), zero
    assert zero.err == (
        f"mailgate: bad {what}: must be at least 1, not 0: a quota of 0 would refuse every message "
        "(no limit: no --default-quota, or a user's quota none)\n"
    )
    assert listed(cli)[ALICE][3:5] == ["default", "default"]
    deliver(store, [ALICE], b"Subject: x\r\n\r\nhello\r\n")


# -- user recount ------------------------------------------------------------


def _keptWrong(store, address, messages, octets):
    """
    Make the use kept for C{address} wrong, as a node of a mailgate from
    before quotas leaves it when it delivers or deletes after the upgrade.
    """

    def write(cursor):
        cursor.execute(
            "UPDATE mailboxes SET used_messages = ?, used_octets = ? "
            "WHERE user_id = (SELECT user_id FROM users WHERE address = ?)",
            (messages, octets, address),
        )

    store.database.run(write, write=True)


def test_userRecountKeepsWhatTheMaildropHolds(cli, store):
    """
    As doveadm quota recalc: the use kept wrong is counted again from the
    messages, and quotas and user list go by the count from then on.
    """
    deliver(store, [ALICE], b"Subject: x\r\n\r\nhello\r\n")
    deliver(store, [ALICE], b"Subject: y\r\n\r\nhello again\r\n")
    _keptWrong(store, ALICE, 7, 99999)
    assert cli("user", "quota", ALICE, "500", "--messages", "5").code == 0
    assert listed(cli)[ALICE][:2] == ["7", "99999"]

    result = cli("user", "recount", ALICE.upper(), BOB)
    assert (result.code, result.err) == (0, ""), result
    assert result.out == (
        f"{ALICE}: 2 messages, 48 octets (was kept as 7 messages, 99999 octets)\n"
        f"{BOB}: 0 messages, 0 octets, as kept\n"
    )
    status = resultOf(store.quotaOf(ALICE))
    assert (status.usedMessages, status.usedOctets) == (2, 48)
    # Over quota no longer: another message is taken, and counted.
    deliver(store, [ALICE], b"Subject: z\r\n\r\nthird\r\n")
    assert listed(cli)[ALICE][:2] == ["3", "69"]


def test_userRecountAll(cli, store):
    deliver(store, [BOB], b"Subject: x\r\n\r\nhello\r\n")
    _keptWrong(store, BOB, 0, 0)
    result = cli("user", "recount", "--all")
    assert (result.code, result.err) == (0, ""), result
    assert result.out == (
        f"{ALICE}: 0 messages, 0 octets, as kept\n"
        f"{BOB}: 1 message, 21 octets (was kept as 0 messages, 0 octets)\n"
        "recounted 2 users; the use kept for 1 was wrong\n"
    )


def test_userRecountAllGoesOnPastAUserDeletedMeanwhile(cli, store, monkeypatch):
    """
    C{user recount --all} reads the list of users, then recounts them one
    by one: a user deleted in between (by another administrator, or a
    provisioning script) is said to be gone, and the users after it are
    still recounted, rather than the command stopping there with "no
    such user" (exit 67) and leaving them uncounted.
    """
    import mailgate.cli

    opened = mailgate.cli.openSynchronousStore

    def openedWithADeletion(*args, **kwargs):
        commandStore = opened(*args, **kwargs)
        listUsers = commandStore.listUsers

        def listThenDelete():
            users = resultOf(listUsers())
            resultOf(store.deleteUser(ALICE))
            return defer.succeed(users)

        commandStore.listUsers = listThenDelete
        return commandStore

    monkeypatch.setattr(mailgate.cli, "openSynchronousStore", openedWithADeletion)
    deliver(store, [BOB], b"Subject: x\r\n\r\nhello\r\n")
    _keptWrong(store, BOB, 0, 0)
    result = cli("user", "recount", "--all")
    assert (result.code, result.err) == (0, ""), result
    assert result.out == (
        f"{ALICE}: no longer a user (deleted or renamed meanwhile), not recounted\n"
        f"{BOB}: 1 message, 21 octets (was kept as 0 messages, 0 octets)\n"
        "recounted 1 user; the use kept for 1 was wrong\n"
    )
    assert resultOf(store.quotaOf(BOB)).usedMessages == 1


@pytest.mark.parametrize(
    "argv, code, error",
    [
        ([], 64, "give the ADDRESSes to recount, or --all"),
        # Both: said as both (it said "give the ADDRESSes, or --all", as
        # if neither had been given).
        (["--all", ALICE], 64, "give the ADDRESSes to recount or --all, not both"),
        (["carol@example.org"], 67, "no such user: carol@example.org"),
        (["not an address"], 65, "not an address of the form local@domain: 'not an address'"),
    ],
)
def test_userRecountRefuses(cli, store, argv, code, error):
    result = cli("user", "recount", *argv)
    assert (result.code, result.out, result.err) == (code, "", f"mailgate: {error}\n")


def test_countsInTheOutputSayTheSingularForOne(cli, store):
    """
    "1 day", "1 message" for one, the plural for two: the CLI's counts
    agree with their nouns.
    """
    assert cli("user", "expire", ALICE, "1").out == f"messages of {ALICE} expire after: 1 day\n"
    assert cli("user", "expire", ALICE, "2").out == f"messages of {ALICE} expire after: 2 days\n"
    deliver(store, [ALICE], b"Subject: x\r\n\r\nhello\r\n")
    assert cli("user", "quota", ALICE, "500M").out == f"quota of {ALICE}: 500M; in use: 1 message, 21 octets\n"
    deliver(store, [ALICE], b"Subject: x\r\n\r\nhello\r\n")
    assert cli("user", "quota", ALICE, "500M").out == f"quota of {ALICE}: 500M; in use: 2 messages, 42 octets\n"


def test_aRestoreInterruptedHalfWaySaysWhatCameBack(cli, store, monkeypatch):
    """
    All of a user's kept mail comes back a few hundred messages at a
    time: stopped half-way (Ctrl-C), what came back is back, and said;
    run again, the rest comes back.
    """
    from mailgate.store import lifecycle

    for n in range(3):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
    keptDeleted(store, ALICE, "wonderland", 1, 2, 3)
    monkeypatch.setattr(lifecycle, "RESTORE_PER_TRANSACTION", 1)
    putBack = interruptedAtTheSecondCall(monkeypatch, lifecycle, "_restoreSome")
    result = cli("mailbox", "restore", ALICE)
    assert (result.code, result.out) == (130, "")
    assert result.err == (
        f"mailgate: stopped after restoring 1 message to {ALICE}; the others are still kept deleted: run the "
        "command again to restore them\nmailgate: interrupted\n"
    )
    assert len(resultOf(store.listMessages(ALICE))) == 1
    putBack()
    result = cli("mailbox", "restore", ALICE)
    assert (result.code, result.out.splitlines()[-1]) == (0, f"2 messages restored to {ALICE}")
    assert len(resultOf(store.listMessages(ALICE))) == 3


def test_aUserDeletionInterruptedHalfWaySaysWhatItRemoved(cli, store, monkeypatch):
    """
    C{user del} empties the maildrop a few hundred messages at a time
    before the user goes: stopped half-way (Ctrl-C), the user is still
    there with what is left, and the command says so; run again, it
    deletes them.
    """
    from mailgate.store import lifecycle

    for n in range(3):
        deliver(store, [ALICE], b"Subject: %d\r\n\r\nhello\r\n" % n)
    monkeypatch.setattr(lifecycle, "EXPUNGE_PER_TRANSACTION", 1)
    putBack = interruptedAtTheSecondCall(monkeypatch, lifecycle, "removeMessages")
    result = cli("user", "del", ALICE)
    assert (result.code, result.out) == (130, "")
    assert result.err == (
        f"mailgate: stopped after removing 1 message and 0 kept deleted messages of {ALICE}, who is not deleted: "
        "run the command again to delete them\nmailgate: interrupted\n"
    )
    assert len(resultOf(store.listMessages(ALICE))) == 2
    putBack()
    result = cli("user", "del", ALICE)
    assert (result.code, result.out) == (0, f"deleted {ALICE} and their maildrop\n")
    assert resultOf(store.findUser(ALICE)) is None


def _recordingAddUsers(monkeypatch, before=None):
    """
    Make the command's store record the size of each batch of users it
    adds (C{addUsers}), calling C{before(number)} ahead of the Nth batch.

    @return: the list of sizes.
    """
    import mailgate.cli

    opened = mailgate.cli.openSynchronousStore
    sizes = []

    def recording(*args, **kwargs):
        commandStore = opened(*args, **kwargs)
        addUsers = commandStore.addUsers

        def recorded(users):
            sizes.append(len(users))
            if before is not None:
                before(len(sizes))
            return addUsers(users)

        commandStore.addUsers = recorded
        return commandStore

    monkeypatch.setattr(mailgate.cli, "openSynchronousStore", recording)
    return sizes


def test_aUserImportAddsNewUsersABatchAtATimeInTheFilesOrder(cli, store, monkeypatch):
    """
    C{user import} adds the users not there yet C{IMPORT_BATCH} to a
    transaction (it committed each alone, three transactions a user),
    each line's outcome printed in the file's order: a user there before
    or added meanwhile by another command (between the file's reading and
    the batch's commit) is "exists", a line refused is said and the rest
    imported, a quota is kept, the summary and exit status as before.
    """
    import mailgate.cli.users

    monkeypatch.setattr(mailgate.cli.users, "IMPORT_BATCH", 2)

    def meanwhile(number):
        if number == 2:
            addUser(store, "u4@example.org", "pw")

    sizes = _recordingAddUsers(monkeypatch, meanwhile)
    passwd = (
        f"{ALICE}:{{PLAIN}}a\nu1@example.org:{{PLAIN}}1\nu2@example.org:{{PLAIN}}2\nu9@example.org:{{PLAIN}}\n"
        "u3@example.org:{PLAIN}3\nu4@example.org:{PLAIN}4\n"
        "u5@example.org:{PLAIN}5::::::userdb_quota_rule=*:storage=1M:messages=10\n"
    )
    result = cli("user", "import", "-", stdin=passwd.encode())
    assert result.code == 65, result
    assert result.out.splitlines() == [
        f"exists {ALICE}",
        "added u1@example.org",
        "added u2@example.org",
        "added u3@example.org",
        "exists u4@example.org",
        "added u5@example.org",
        "4 added, 2 already there, 1 failed",
    ]
    assert "line 4" in result.err and "line 4" in result.err.splitlines()[0], result
    assert sizes == [2, 2, 1]
    quota = resultOf(store.quotaOf("u5@example.org"))
    assert (quota.quotaOctets, quota.quotaMessages) == (1 << 20, 10)
    assert sorted(u.address for u in resultOf(store.listUsers())) == sorted(
        [ALICE, BOB] + [f"u{n}@example.org" for n in range(1, 6)]
    )


def test_addUsersLeavesATakenAddressAndAddsTheRest(cli, store, monkeypatch):
    """
    C{addUsers} adds its users in one transaction; an address taken is
    C{False} and leaves that user as they are, without undoing the others
    (on PostgreSQL a unique violation would abort the transaction); an
    address given twice is added once, the first time.  So with the rows
    of one statement and of several.
    """
    from mailgate.auth.passwords import makeCredentials
    from mailgate.store import sql
    from mailgate.testing import TEST_HASH_COST

    monkeypatch.setattr(sql, "ROWS_PER_INSERT", 2)
    before = resultOf(store.findUser(ALICE))
    quotaBefore = resultOf(store.quotaOf(ALICE))
    credentials = makeCredentials("pw", logN=TEST_HASH_COST)
    added = resultOf(store.addUsers([
        ("n1@example.org", credentials, {}),
        (ALICE, credentials, {"octets": 5}),
        ("n2@example.org", credentials, {"messages": 7}),
        ("n1@example.org", credentials, {"octets": 9}),
        ("n3@example.org", credentials, {"octets": 9}),
        ("n3@example.org", credentials, {"octets": 10}),
    ]))
    assert added == [True, False, True, False, True, False]
    assert resultOf(store.findUser(ALICE)).passwordHash == before.passwordHash
    assert resultOf(store.quotaOf(ALICE)) == quotaBefore
    assert resultOf(store.quotaOf("n2@example.org")).quotaMessages == 7
    assert resultOf(store.quotaOf("n1@example.org")).quotaOctets is None
    assert resultOf(store.quotaOf("n3@example.org")).quotaOctets == 9
    assert resultOf(store.findUser("n1@example.org")).passwordHash == credentials.passwordHash


def test_aUserImportInterruptedSaysWhatItAdded(cli, store, monkeypatch):
    """
    Stopped (Ctrl-C) while adding its second batch, C{user import} says
    how many users it added (those printed), and that the batch being
    added may or may not be; run again, it adds the rest and finds the
    others there.
    """
    import mailgate.cli.users
    from mailgate.store import sql

    monkeypatch.setattr(mailgate.cli.users, "IMPORT_BATCH", 2)
    putBack = interruptedAtTheSecondCall(monkeypatch, sql, "_addUsers")
    passwd = "".join(f"u{n}@example.org:{{PLAIN}}{n}\n" for n in range(1, 6)).encode()
    result = cli("user", "import", "-", stdin=passwd)
    assert (result.code, result.out) == (130, "added u1@example.org\nadded u2@example.org\n")
    assert result.err == (
        "mailgate: stopped after adding 2 users of - (said above); the 2 users being added when it stopped may "
        "or may not be: run the command again to import the rest (users there are left as they are)\n"
        "mailgate: interrupted\n"
    )
    putBack()
    result = cli("user", "import", "-", stdin=passwd)
    assert (result.code, result.out.splitlines()) == (0, [
        "exists u1@example.org", "exists u2@example.org",
        "added u3@example.org", "added u4@example.org", "added u5@example.org",
        "3 added, 2 already there, 0 failed",
    ])


def test_aUserImportLooksUsersUpABatchOfLinesAtATime(cli, store, monkeypatch):
    """
    C{user import} looks the users of C{IMPORT_BATCH} lines up at once
    (C{findUsers}, one statement), not each line's alone (a transaction a
    line: on PostgreSQL most of a run again's time); what each line says is
    unchanged, in the file's order, a refused line said with its number,
    run again all "exists" without a lookup of its own.
    """
    import mailgate.cli
    import mailgate.cli.users

    monkeypatch.setattr(mailgate.cli.users, "IMPORT_BATCH", 2)
    opened = mailgate.cli.openSynchronousStore
    lookups = []

    def recording(*args, **kwargs):
        commandStore = opened(*args, **kwargs)
        findUser, findUsers = commandStore.findUser, commandStore.findUsers
        commandStore.findUser = lambda address: lookups.append(address) or findUser(address)
        commandStore.findUsers = lambda addresses: lookups.append(list(addresses)) or findUsers(addresses)
        return commandStore

    monkeypatch.setattr(mailgate.cli, "openSynchronousStore", recording)
    passwd = (
        f"{ALICE}:{{PLAIN}}a\nu1@example.org:{{PLAIN}}1\nnot a line\nu2@example.org:{{PLAIN}}2\n"
        f"{BOB}:{{PLAIN}}b\nu3@example.org:{{PLAIN}}3\n"
    ).encode()
    result = cli("user", "import", "-", stdin=passwd)
    assert (result.code, result.out.splitlines()) == (65, [
        f"exists {ALICE}", "added u1@example.org", "added u2@example.org", f"exists {BOB}", "added u3@example.org",
        "3 added, 2 already there, 1 failed",
    ])
    assert result.err.startswith("mailgate: - line 3: "), result
    assert lookups == [[ALICE, "u1@example.org"], ["u2@example.org"], [BOB, "u3@example.org"]]
    del lookups[:]
    result = cli("user", "import", "-", stdin=passwd)
    assert result.out.splitlines()[-1] == "0 added, 5 already there, 1 failed"
    assert lookups == [[ALICE, "u1@example.org"], ["u2@example.org"], [BOB, "u3@example.org"]]
