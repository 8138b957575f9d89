"""
C{mailgate db copy}: moving a whole mailgate database between backends,
SQLite to PostgreSQL and back, through the admin command.

What must survive, as users see it: the users, their passwords (USER/PASS
logins work), APOP secrets (APOP logins work), message numbers, sizes,
arrival times and unique ids (C{mailgate mailbox list} and POP3 UIDL are
the same before and after, so clients that leave mail on the server do
not download it again), every octet of the messages (one spanning many
storage chunks), and bodies shared by several recipients stay shared.
Afterwards the target lives on: new users get fresh ids, new mail new
unique ids.  A target that is not empty is refused (exit 73) and left
as it was.

The command runs in-process (C{mailgate.cli.run}), plus once as the
installed C{mailgate} executable.
"""

import hashlib
import io
import json
import os
import re
import time

import pytest

from e2e import MAILGATE, runCommand
from mailgate.cli import run
from mailgate.store import openSynchronousStore, sql
from mailgate.store.copy import CHUNKS_PER_READ, ROWS_PER_READ
from mailgate.store.sql import CHUNK_SIZE
from mailgate.testing import POP3Session, deliver, resultOf

# The command's new passwords are hashed cheaply here (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cheapCommandHashes")

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
DAVE = "dave@example.org"
ERIN = "erin@example.org"
PASSWORDS = {ALICE: "alice in wonderland", BOB: "bob-the-builder", CAROL: "c4rol", DAVE: "dave"}

# More than CHUNKS_PER_READ storage chunks, and not a whole number of them;
# lines starting with dots, every octet value.
BIG = (
    b"From: big@example.net\r\nSubject: big\r\n\r\n"
    + b"".join(
        (b"." if n % 7 == 0 else b"") + b"%06d " % n + bytes(range(32, 127)) + b"\r\n"
        for n in range(((CHUNKS_PER_READ + 3) * CHUNK_SIZE) // 100)
    )
    + bytes(range(128, 256))
    + b"\r\n.\r\nlast\r\n"
)
SHARED = b"From: list@example.net\r\nSubject: for everybody\r\n\r\nshared body\r\n"
# More messages in one maildrop than the copy reads in one page.
MANY = ROWS_PER_READ + 20


def mailgate(*argv, input=b""):
    """
    C{mailgate argv...} in-process; returns (exit status, stdout, stderr).
    """
    out, err = io.StringIO(), io.StringIO()
    stdin = io.TextIOWrapper(io.BytesIO(input), encoding="utf-8", newline="")
    code = run(list(argv), stdin=stdin, stdout=out, stderr=err, environ={})
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return code, out.getvalue(), err.getvalue()


def check(*argv, input=b""):
    code, out, err = mailgate(*argv, input=input)
    assert code == 0, f"mailgate {' '.join(argv)} exited {code}\nstdout: {out}\nstderr: {err}"
    return out


def message(n):
    return b"From: s@example.net\r\nSubject: message %d\r\n\r\n.dot line %d\r\n" % (n, n)


def populate(url):
    """
    A database as a real installation would have it: users added and mail
    delivered with the admin command, a user deleted (a gap in the user
    ids), messages removed by a POP3 client (gaps in the unique ids), one
    message for three users, a large one, an empty one, and a maildrop
    larger than the copy's page size.
    """
    for address in (ALICE, DAVE, CAROL):
        check("--database", url, "user", "add", address, "--password-stdin",
              input=PASSWORDS[address].encode() + b"\n")
    check("--database", url, "user", "add", BOB, "--password-stdin", "--apop",
          input=PASSWORDS[BOB].encode() + b"\n")
    check("--database", url, "user", "del", DAVE)
    for n in range(4):
        check("--database", url, "deliver", ALICE, input=message(n))
    check("--database", url, "deliver", ALICE, BOB, CAROL, input=SHARED)
    check("--database", url, "deliver", ALICE, input=BIG)
    check("--database", url, "deliver", BOB, input=b"")
    store = openSynchronousStore(url)
    try:
        for n in range(MANY):
            deliver(store, [CAROL], message(100 + n))
        # A POP3 client removes messages 2 and 3 of alice's.
        session = POP3Session(store)
        assert session.login(ALICE, PASSWORDS[ALICE]).startswith("+OK")
        assert session.command("DELE 2").startswith("+OK")
        assert session.command("DELE 3").startswith("+OK")
        assert session.command("QUIT").startswith("+OK")
    finally:
        store.close()


def users(url):
    return check("--database", url, "user", "list")


def mailbox(url, address):
    return check("--database", url, "mailbox", "list", address)


def snapshot(url):
    """
    Everything the admin command shows about a database.
    """
    return {"users": users(url), **{a: mailbox(url, a) for a in (ALICE, BOB, CAROL)}}


def uniqueIds(listing):
    # The messages, then (after an empty line) the maildrop's use.
    return [line.split()[2] for line in listing.split("\n\n", 1)[0].splitlines()[1:]]


def query(store, sql, args=()):
    def rows(cursor):
        cursor.execute(sql, args)
        return [tuple(row) for row in cursor.fetchall()]

    return store.database.run(rows)


def retr(session, number):
    """
    RETR through a POP3 session: the message, dot-stuffing undone.
    """
    reply = session.send(b"RETR %d\r\n" % number)
    status, _, body = reply.partition(b"\r\n")
    assert status.startswith(b"+OK"), status
    assert body == b".\r\n" or body.endswith(b"\r\n.\r\n"), body[-20:]
    lines = body[: -len(b".\r\n")].split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def uidl(session):
    reply = session.command("UIDL").split("\r\n")
    assert reply[0].startswith("+OK") and reply[-2:] == [".", ""], reply[:3]
    return [line.split()[1] for line in reply[1:-2]]


def assertServedLikeTheOriginal(url, expected):
    """
    The database at C{url} serves what C{expected} (a L{snapshot} of the
    source) lists, to POP3 clients logging in with their passwords and
    with APOP.
    """
    assert snapshot(url) == expected
    store = openSynchronousStore(url)
    try:
        # USER/PASS with the password given at "user add".
        session = POP3Session(store)
        reply = session.login(ALICE, PASSWORDS[ALICE])
        assert reply.startswith(f"+OK {ALICE} has 4 messages"), reply
        assert uidl(session) == uniqueIds(expected[ALICE])
        assert retr(session, 1) == message(0)
        assert retr(session, 2) == message(3)
        assert retr(session, 3) == SHARED
        assert retr(session, 4) == BIG
        assert session.command("QUIT").startswith("+OK")
        # A wrong password is still wrong.
        session = POP3Session(store)
        assert session.login(CAROL, PASSWORDS[ALICE]).startswith("-ERR [AUTH]")
        # APOP, with the secret kept for bob.
        session = POP3Session(store)
        digest = hashlib.md5((session.challenge + PASSWORDS[BOB]).encode()).hexdigest()
        reply = session.command(f"APOP {BOB} {digest}")
        assert reply.startswith(f"+OK {BOB} has 2 messages"), reply
        assert uidl(session) == uniqueIds(expected[BOB])
        assert retr(session, 1) == SHARED
        assert retr(session, 2) == b""
        assert session.command("QUIT").startswith("+OK")
        # Carol's maildrop, larger than a page of the copy.
        session = POP3Session(store)
        reply = session.login(CAROL, PASSWORDS[CAROL])
        assert reply.startswith(f"+OK {CAROL} has {MANY + 1} messages"), reply
        assert uidl(session) == uniqueIds(expected[CAROL])
        assert retr(session, MANY + 1) == message(100 + MANY - 1)
        assert session.command("QUIT").startswith("+OK")
        # The message for three users is stored once, shared by all three.
        owners = query(
            store,
            "SELECT m.body_owner, m.body_id, b.refcount FROM maildrop m "
            "JOIN bodies b ON b.owner_id = m.body_owner AND b.body_id = m.body_id "
            "WHERE b.size = ? ORDER BY m.user_id",
            (len(SHARED),),
        )
        assert len(owners) == 3 and len(set(owners)) == 1, owners
        assert owners[0][2] == 3
    finally:
        store.close()


def storedUsers(url):
    store = openSynchronousStore(url)
    try:
        return {a: resultOf(store.findUser(a)) for a in (ALICE, BOB, CAROL)}
    finally:
        store.close()


def bodyCount(url):
    store = openSynchronousStore(url)
    try:
        return query(store, "SELECT count(*) FROM bodies")[0][0]
    finally:
        store.close()


def assertLivesOn(url, copied):
    """
    After a copy the target takes new users and new mail without
    colliding with anything copied.
    """
    before = storedUsers(url)
    check("--database", url, "user", "add", ERIN, "--password-stdin", input=b"erin\n")
    store = openSynchronousStore(url)
    try:
        erin = resultOf(store.findUser(ERIN))
    finally:
        store.close()
    assert erin.userId not in {u.userId for u in before.values()}
    assert erin.userId > max(u.userId for u in before.values())
    out = check("--database", url, "deliver", ALICE, ERIN, input=message(999))
    fresh = dict(re.findall(r"delivered to (\S+) as (\S+)", out))
    assert fresh[ALICE] not in uniqueIds(copied[ALICE])
    # Alice's counter went on from where it was, not from 1.
    assert int(fresh[ALICE][:8], 16) > max(int(u[:8], 16) for u in uniqueIds(copied[ALICE]))
    assert uniqueIds(mailbox(url, ALICE)) == uniqueIds(copied[ALICE]) + [fresh[ALICE]]
    assert uniqueIds(mailbox(url, ERIN)) == [fresh[ERIN]]


def dotColumns(url):
    """
    What each maildrop row knows of its lines that start with "." (what
    lets POP3 stuff a message without searching it).
    """
    store = openSynchronousStore(url)
    try:
        rows = query(store, "SELECT user_id, uid, dot_lines, dot_at FROM maildrop ORDER BY user_id, uid")
    finally:
        store.close()
    return [(u, i, d, None if at is None else bytes(at)) for u, i, d, at in rows]


def test_sqliteToPostgresAndBack(tmp_path, postgresURL):
    source = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    populate(source)
    original = snapshot(source)
    dots = dotColumns(source)
    # The large message and the numbered ones have dot lines.
    assert sum(at is not None for _, _, _, at in dots) > MANY
    originalUsers = storedUsers(source)
    bodies = bodyCount(source)

    out = check("db", "copy", "--from", source, "--to", postgresURL)
    assert out == (
        f"copied 3 users and {4 + 2 + MANY + 1} messages ({bodies} bodies, "
        f"{len(message(0)) + len(message(3)) + len(SHARED) + len(BIG) + sum(len(message(100 + n)) for n in range(MANY))} octets); "
        "unique ids preserved\n"
    )
    assertServedLikeTheOriginal(postgresURL, original)
    # Ids, password hashes, SCRAM verifiers and APOP secrets, as stored.
    assert storedUsers(postgresURL) == originalUsers
    assert bodyCount(postgresURL) == bodies
    assert dotColumns(postgresURL) == dots
    # The source is untouched.
    assert snapshot(source) == original

    back = f"sqlite:///{tmp_path / 'back.sqlite3'}"
    check("db", "copy", "--from", postgresURL, "--to", back)
    assertServedLikeTheOriginal(back, original)
    assert storedUsers(back) == originalUsers
    assert bodyCount(back) == bodies
    assert dotColumns(back) == dots

    assertLivesOn(postgresURL, original)
    assertLivesOn(back, original)


def test_copyIntoANonEmptyDatabaseChangesNothing(tmp_path, postgresURL):
    source = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    populate(source)
    original = snapshot(source)
    check("--database", postgresURL, "user", "add", ERIN, "--password-stdin", input=b"erin\n")
    uid = re.search(r"as (\S+)", check("--database", postgresURL, "deliver", ERIN, input=message(1))).group(1)
    before = users(postgresURL), mailbox(postgresURL, ERIN)

    code, out, err = mailgate("db", "copy", "--from", source, "--to", postgresURL)
    assert code == 73, (code, out, err)
    assert out == ""
    assert "already has users" in err and err.startswith("mailgate: "), err
    assert (users(postgresURL), mailbox(postgresURL, ERIN)) == before
    assert uniqueIds(before[1]) == [uid]
    code, out, err = mailgate("--database", postgresURL, "mailbox", "list", ALICE)
    assert code == 67, (code, out, err)
    assert snapshot(source) == original

    # The other way round as well: a SQLite target with a user.
    code, out, err = mailgate("db", "copy", "--from", postgresURL, "--to", source)
    assert code == 73, (code, out, err)
    assert snapshot(source) == original
    code, out, err = mailgate("--database", source, "mailbox", "list", ERIN)
    assert code == 67, (code, out, err)


def test_installedCommand(tmp_path, postgresURL):
    """
    The installed C{mailgate} executable, as an administrator runs it.
    """
    source = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    populate(source)
    original = snapshot(source)
    code, out, err = runCommand(
        [MAILGATE, "db", "copy", "--from", source, "--to", postgresURL], timeout=60
    )
    assert code == 0, (code, out, err)
    assert re.fullmatch(r"copied 3 users and \d+ messages \(\d+ bodies, \d+ octets\); unique ids preserved\n", out), out
    for address in (ALICE, BOB, CAROL):
        code, out, err = runCommand([MAILGATE, "--database", postgresURL, "mailbox", "list", address])
        assert code == 0, err
        assert out == original[address]
    # Again into the now non-empty target: refused.
    code, out, err = runCommand([MAILGATE, "db", "copy", "--from", source, "--to", postgresURL])
    assert code == 73, (code, out, err)
    assert snapshot(postgresURL) == original


def bans(url):
    return [json.loads(line) for line in check("--database", url, "ban", "list", "--json").splitlines()]


def test_bansInForceAreCopied(tmp_path, postgresURL):
    """
    An administrator's bans (for as long as ten years) and those failed
    logins made are still in force after the move, both ways: the nodes
    on the new database keep out whom the old one kept out.  A ban the
    target has already (made by a node started on it before the copy)
    is kept, and the bans' version is raised so that running nodes load
    the copied ones.
    """
    source = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    check("--database", source, "user", "add", ALICE, "--password-stdin", input=b"pw\n")
    check("--database", source, "ban", "add", "192.0.2.7", "--for", str(10 * 365 * 86400))
    check("--database", source, "ban", "add", "2001:db8::1", "--for", "3600")
    check("--database", postgresURL, "ban", "add", "198.51.100.1", "--for", "600")
    store = openSynchronousStore(postgresURL)
    try:
        before = query(store, "SELECT version FROM ban_version")
    finally:
        store.close()
    original = bans(source)
    assert [b["address"] for b in original] == ["192.0.2.7", "2001:db8::/64"]

    out = check("db", "copy", "--from", source, "--to", postgresURL)
    assert out.endswith("unique ids preserved\ncopied 2 bans in force\n"), out
    copied = bans(postgresURL)
    assert [b for b in copied if b["address"] != "198.51.100.1"] == original
    assert "198.51.100.1" in [b["address"] for b in copied]
    store = openSynchronousStore(postgresURL)
    try:
        assert query(store, "SELECT version FROM ban_version")[0][0] > before[0][0]
    finally:
        store.close()

    back = f"sqlite:///{tmp_path / 'back.sqlite3'}"
    check("db", "copy", "--from", postgresURL, "--to", back)
    assert bans(back) == copied


def _writeBan(url, address, reason, expires):
    store = openSynchronousStore(url)
    try:
        def write(cursor):
            cursor.execute(
                "INSERT INTO bans (address, reason, failures, created_at, expires_at) VALUES (?, ?, 0, ?, ?)",
                (address, reason, expires, expires),
            )

        store.database.run(write, write=True)
    finally:
        store.close()


def test_theMarkersOfForgottenFailuresAreNoBansToCopy(tmp_path, postgresURL):
    """
    The marker an earlier mailgate's C{ban del} left for an address it
    released without a ban (reason C{forgotten}) is not copied as a ban in force, even where the
    clock of the host copying is behind the one that wrote it; and a
    target's marker gives way to the source's ban of that address, which
    was kept out before (C{ON CONFLICT DO NOTHING}).
    """
    source = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    check("--database", source, "user", "add", ALICE, "--password-stdin", input=b"pw\n")
    check("--database", source, "ban", "add", "192.0.2.7", "--for", "3600")
    # Written by a host whose clock is an hour ahead of this one's.
    _writeBan(source, "192.0.2.9", "forgotten", int(time.time()) + 3600)
    check("--database", postgresURL, "db", "upgrade")
    _writeBan(postgresURL, "192.0.2.7", "forgotten", int(time.time()) + 3600)

    out = check("db", "copy", "--from", source, "--to", postgresURL)
    assert out.endswith("unique ids preserved\ncopied 1 ban in force\n"), out
    assert [(b["address"], b["reason"]) for b in bans(postgresURL)] == [("192.0.2.7", "admin")]


@pytest.mark.parametrize("order", ["sqlite-to-postgres", "postgres-to-sqlite"])
def test_aSourceWrittenDuringTheCopyIsCopiedAsItWasWhenTheCopyBegan(tmp_path, postgresURL, monkeypatch, order):
    """
    A server that was not stopped delivers to the source while the copy
    runs (here, once the bodies are copied and before the maildrops
    are): the copy is the source as it was when it began, every message
    with its body and each user's uid counter past their messages, so
    the target serves and takes mail; the message delivered meanwhile
    is not half in it.
    """
    import mailgate.store.copy as copying

    sqlite = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    source, target = (sqlite, postgresURL) if order == "sqlite-to-postgres" else (postgresURL, sqlite)
    check("--database", source, "user", "add", ALICE, "--password-stdin", input=b"pw\n")
    check("--database", source, "deliver", ALICE, input=message(1))
    original = mailbox(source, ALICE)
    insert = copying._insert
    late = []

    def deliveringMeanwhile(cursor, table, columns, rows):
        insert(cursor, table, columns, rows)
        if table == "bodies" and not late:
            late.append(check("--database", source, "deliver", ALICE, input=message(2)))

    monkeypatch.setattr(copying, "_insert", deliveringMeanwhile)
    check("db", "copy", "--from", source, "--to", target)
    monkeypatch.undo()
    assert late and uniqueIds(mailbox(source, ALICE)) != uniqueIds(original)
    assert mailbox(target, ALICE) == original
    store = openSynchronousStore(target)
    try:
        session = POP3Session(store)
        assert session.login(ALICE, "pw").startswith("+OK")
        assert retr(session, 1) == message(1)
        assert session.command("QUIT").startswith("+OK")
    finally:
        store.close()
    out = check("--database", target, "deliver", ALICE, input=message(3))
    assert len(uniqueIds(mailbox(target, ALICE))) == 2, out


def test_aCopyIntoATargetAnotherCopyFilledMeanwhileIsRefusedAsNotEmpty(tmp_path, postgresURL, monkeypatch):
    """
    Two copies into the same empty PostgreSQL target at once (a copy run
    again while the first still runs): both find it empty, the first
    commits, and the second's rows collide with the first's.  It is
    refused as a copy into a database that has users (exit 73), not an
    internal error naming the driver's UniqueViolation (exit 70; probe:
    two mailgate db copy into one schema half a second apart), and the
    first copy's target stays as it made it.
    """
    import mailgate.store.copy as copying

    source = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    check("--database", source, "user", "add", ALICE, "--password-stdin", input=b"pw\n")
    check("--database", source, "deliver", ALICE, input=message(1))
    read = copying._readSnapshot

    def anotherCopyFirst(sourceStore, readOne):
        # The other copy, which found the target empty as well, commits
        # its users and mail now.
        monkeypatch.setattr(copying, "_readSnapshot", read)
        check("db", "copy", "--from", source, "--to", postgresURL)
        return read(sourceStore, readOne)

    monkeypatch.setattr(copying, "_readSnapshot", anotherCopyFirst)
    code, out, err = mailgate("db", "copy", "--from", source, "--to", postgresURL)
    assert (code, out) == (73, ""), (code, out, err)
    assert err.startswith("mailgate: the target database already has users"), err
    assert mailbox(postgresURL, ALICE) == mailbox(source, ALICE)


def madeUpSalt(url, address):
    """
    The salt a SCRAM-SHA-256 exchange shows a client for C{address}, one
    with no user: made up from the key the nodes share, the same at every
    ask, as a real user's is.
    """
    from saslclients import ScramClient, b64, unb64

    store = openSynchronousStore(url)
    try:
        session = POP3Session(store)
        reply = session.command("AUTH SCRAM-SHA-256 " + b64(ScramClient(address, "guess").first()))
        assert reply.startswith("+ "), reply
        return dict(item.split("=", 1) for item in unb64(reply[2:].strip()).decode().split(","))["s"]
    finally:
        store.close()


def test_theMadeUpSaltsOfUnknownUsersAreTheSameAfterTheMove(tmp_path, postgresURL):
    """
    SCRAM shows a name with no user a salt made up from a key the nodes
    share, so that a client cannot tell real users (whose salt stays) from
    the others.  The copy brings that key along, replacing the one a node
    started on the target made: with a new key every made-up salt changed
    at the move while real users' stayed, and a client that asked before
    and after could tell which names are real.
    """
    source = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    check("--database", source, "user", "add", ALICE, "--password-stdin", input=b"pw\n")
    before = madeUpSalt(source, "nobody@example.org")
    assert madeUpSalt(source, "nobody@example.org") == before
    # A node started on the target before the copy made a key of its own.
    made = madeUpSalt(postgresURL, "nobody@example.org")
    assert made != before
    check("db", "copy", "--from", source, "--to", postgresURL)
    assert madeUpSalt(postgresURL, "nobody@example.org") == before
    back = f"sqlite:///{tmp_path / 'back.sqlite3'}"
    check("db", "copy", "--from", postgresURL, "--to", back)
    assert madeUpSalt(back, "nobody@example.org") == before


def test_theDeletedMessagesKeptForRecoveryAreCopiedAndCounted(tmp_path):
    """
    Messages deleted by a POP3 client and kept for recovery
    (--keep-deleted-days) come along, restorable on the target, and the
    report counts them apart: its bodies and octets include theirs, and
    "N messages" alone made the figures look wrong.
    """
    source = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    target = f"sqlite:///{tmp_path / 'target.sqlite3'}"
    check("--database", source, "user", "add", ALICE, "--password-stdin", input=PASSWORDS[ALICE].encode() + b"\n")
    for n in range(3):
        check("--database", source, "deliver", ALICE, input=message(n))
    store = openSynchronousStore(source)
    try:
        store.limits.keepDeletedDays = 7
        session = POP3Session(store)
        assert session.login(ALICE, PASSWORDS[ALICE]).startswith("+OK")
        assert session.command("DELE 2").startswith("+OK")
        assert session.command("QUIT").startswith("+OK")
    finally:
        store.close()
    deleted = check("--database", source, "mailbox", "deleted", ALICE)
    assert len(deleted.splitlines()) == 2, deleted  # a heading and the message
    out = check("db", "copy", "--from", source, "--to", target)
    octets = sum(len(message(n)) for n in range(3))
    assert out == (
        f"copied 1 user and 2 messages and 1 deleted message kept for recovery (3 bodies, {octets} octets); "
        "unique ids preserved\n"
    )
    assert check("--database", target, "mailbox", "deleted", ALICE) == deleted
    check("--database", target, "mailbox", "restore", ALICE, "--since", "1h")
    assert len(mailbox(target, ALICE).splitlines()) == len(mailbox(source, ALICE).splitlines()) + 1


@pytest.mark.parametrize("direction", ["to postgres", "to sqlite"])
def test_aCopyInterruptedIsSaidToHaveCopiedNothing(tmp_path, postgresURL, monkeypatch, direction):
    """
    Ctrl-C in the middle of a copy: the copy is one transaction on the
    target, undone, and the command says so and exits 130.  psycopg,
    interrupted in an C{executemany}'s pipeline, failed cleaning up in
    its own words ("cannot exit pipeline mode while busy", raised while
    the interrupt was handled), which was taken for the database's:
    "temporary failure, try again: database unavailable", exit 75 (probe:
    SIGINT 5 s into a copy of 50,000 users and 200,000 messages from
    SQLite into PostgreSQL).  Here the driver's error is a statement
    that fails while the interrupt is handled.
    """
    from mailgate.store import copy

    sqlite = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    check("--database", sqlite, "user", "add", ALICE, "--password-stdin", input=b"alice\n")
    check("--database", sqlite, "deliver", ALICE, input=message(1))
    source, target = (sqlite, postgresURL) if direction == "to postgres" else (postgresURL, sqlite)
    if direction == "to sqlite":
        check("db", "copy", "--from", sqlite, "--to", postgresURL)
        os.unlink(sqlite[len("sqlite:///"):])
    insert = copy._insert

    def interrupted(cursor, table, columns, rows):
        if table != "bodies":
            return insert(cursor, table, columns, rows)
        try:
            raise KeyboardInterrupt()
        except KeyboardInterrupt:
            cursor.execute("SELECT * FROM no_such_table")

    monkeypatch.setattr(copy, "_insert", interrupted)
    code, out, err = mailgate("db", "copy", "--from", source, "--to", target)
    assert (code, out, err) == (
        130, "", "mailgate: nothing was copied (the copy is one transaction, undone)\nmailgate: interrupted\n"
    )
    if direction == "to postgres":
        assert users(target).splitlines()[1:] == []
    else:
        assert not os.path.exists(sqlite[len("sqlite:///"):])


def _removeByHand(url, address, counters):
    """
    Delete C{address}'s users row as someone would by hand (not with
    C{user del}), his mail left; with C{counters}, his maildrop's
    counters (his mailboxes row) too.
    """
    store = openSynchronousStore(url)
    try:
        [(userId,)] = query(store, "SELECT user_id FROM users WHERE address = ?", (address,))

        def remove(cursor):
            cursor.execute("DELETE FROM users WHERE user_id = ?", (userId,))
            if counters:
                cursor.execute("DELETE FROM mailboxes WHERE user_id = ?", (userId,))

        store.database.run(remove, write=True)
    finally:
        store.close()
    return userId


def _userId(url, address):
    store = openSynchronousStore(url)
    try:
        return resultOf(store.findUser(address)).userId
    finally:
        store.close()


def _assertNewUsersGetNoneOfTheMailLeft(url, orphan, past=0):
    """
    On C{url}, where the mail of user number C{orphan} is left without
    its user: new users, added alone and imported, are added (exit 0) under
    other ids (past C{past}), and have no mail; C{db check} still finds
    the mail left.
    """
    check("--database", url, "user", "add", ERIN, "--password-stdin", input=b"erin\n")
    check("--database", url, "user", "import", "-", "--domain", "example.org", input=b"frank:{PLAIN}frank\n")
    for address in (ERIN, "frank@example.org"):
        assert _userId(url, address) != orphan
        assert _userId(url, address) > past
        assert uniqueIds(mailbox(url, address)) == []
    code, out, _ = mailgate("--database", url, "db", "check")
    assert code == 65 and f"user number {orphan}: messages, and no such user" in out, out


@pytest.mark.parametrize("counters", ["counters left", "counters removed"])
@pytest.mark.parametrize("direction", ["sqlite-to-postgres", "postgres-to-sqlite"])
def test_aCopyGivesNewUsersNoIdTheMailOfARemovedUserHolds(tmp_path, postgresURL, monkeypatch, direction, counters):
    """
    A user removed by hand (his users row), his mail left, the last user
    added: after a copy, the target's counter went past the users only,
    and the next user was given his id: refused with his maildrop's
    counters there (user add exit 70, duplicate key on mailboxes), or,
    with those removed too, given his mail.  Now the target's ids go on
    past every id its rows hold, and every id the source gave (a user
    deleted since, with user del).  Seen without user add's own check
    (the next test's), which would skip the ids held.
    """
    sqlite = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    source, target = (sqlite, postgresURL) if direction == "sqlite-to-postgres" else (postgresURL, sqlite)
    for address in (ALICE, BOB, CAROL):
        check("--database", source, "user", "add", address, "--password-stdin", input=b"pw\n")
        check("--database", source, "deliver", address, input=message(1))
    orphan = _removeByHand(source, CAROL, counters == "counters removed")
    check("--database", source, "user", "add", DAVE, "--password-stdin", input=b"pw\n")
    dave = _userId(source, DAVE)
    check("--database", source, "user", "del", DAVE)
    check("db", "copy", "--from", source, "--to", target)
    monkeypatch.setattr(sql, "_heldUserIds", lambda cursor, userIds: set())
    _assertNewUsersGetNoneOfTheMailLeft(target, orphan, past=dave)


def test_userAddSkipsAnIdTheMailOfARemovedUserHolds(databaseURL):
    """
    Where the id counter was set back (a database copied by a mailgate
    before the fix above, a sequence reset by hand) to the id of a user
    removed by hand whose mail is left: user add and user import move
    past it, rather than exit 70 or give his mail to the new user.
    """
    url = databaseURL
    for address in (ALICE, BOB):
        check("--database", url, "user", "add", address, "--password-stdin", input=b"pw\n")
        check("--database", url, "deliver", address, input=message(1))
    orphan = _removeByHand(url, BOB, counters=False)
    store = openSynchronousStore(url)
    try:
        def setBack(cursor):
            if url.startswith("sqlite"):
                cursor.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'users'", (orphan - 1,))
            else:
                cursor.execute("SELECT setval(pg_get_serial_sequence('users', 'user_id'), ?, false)", (orphan,))

        store.database.run(setBack, write=True)
    finally:
        store.close()
    _assertNewUsersGetNoneOfTheMailLeft(url, orphan)
