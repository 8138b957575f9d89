"""
Each recipient's copy names its recipient (C{--delivered-to final}, the
default): a C{Delivered-To:} field after its C{Return-Path:}, as Dovecot's
LMTP writes it, while the message is still stored once for all its local
recipients (a row of C{maildrop_prefixes} per copy, schema 20).

End to end on real servers (C{twistd mailgate}, smtplib's LMTP and SMTP
clients, poplib, raw POP3 for the wire form), on SQLite and PostgreSQL:
each copy as POP3 sends it, byte for byte (RETR, TOP n 0, TOP n 3, LIST,
UIDL, dot-stuffing); one body stored; DELE of one copy leaves the other;
C{mailbox restore}, C{mailbox export}, C{db copy} both ways and C{mailgate
deliver --sender} keep or write it; C{db check} accepts it and still finds
a wrong size; an older database's mail reads as before after the
migration; C{--delivered-to none} writes none.  The comparison with the
real Dovecot is in test_lmtp_vs_dovecot.py.
"""

import os
import re
import smtplib

import pytest

from e2e import DEADLINE, mailgate_cli, mailgate_server, mailgateHere, popLogin, retrieve, sqliteOnly  # noqa: F401
from mailgate.message import spoolBytes
from mailgate.store import engineFromURL, openSynchronousStore
from mailgate.store.database import runTransaction
from mailgate.store.schema import LATEST, currentVersion
from mailgate.testing import POP3Session, addUser, resultOf

ALICE = "alice@example.org"
BOB = "bob@example.org"
ABUSE = "abuse@example.org"
PASSWORD = "wonder land"
SENDER = "sender@remote.test"
LISTEN = "tcp:0:interface=127.0.0.1"
NAMED = {ALICE: "Alice+Lists@example.org", BOB: ABUSE}

# Lines starting with "." (stuffed on the wire), one a lone dot, and more
# than three body lines (TOP n 3).
MESSAGE = (
    b"From: sender@remote.test\r\nTo: lists@example.org\r\nSubject: dots\r\n\r\n"
    b"first line\r\n.leading dot\r\n.\r\n..two dots\r\nlast line\r\n"
)


def query(url, statement, *args):
    """
    The rows of one statement, read as an administrator's SQL would.
    """
    engine = engineFromURL(url)
    conn = engine.connect()
    try:
        def read(cursor):
            cursor.execute(statement, args)
            return cursor.fetchall()

        return runTransaction(engine, conn, read, (), {}, True)
    finally:
        conn.close()


def lmtp(server):
    client = smtplib.LMTP(timeout=DEADLINE)
    client.connect("127.0.0.1", server.portOf("LMTP"))
    client.ehlo("mta.test")
    return client


def smtp(server):
    client = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE)
    client.ehlo("mta.test")
    return client


def send(client, replies):
    """
    One message for alice (named with a detail, another case) and bob
    (named by his alias); the unique ids the replies give, by user.
    """
    assert client.mail(SENDER)[0] == 250
    assert [client.rcpt(NAMED[user])[0] for user in (ALICE, BOB)] == [250, 250]
    ended = [client.data(MESSAGE)] + [client.getreply() for _ in range(replies - 1)]
    assert [code for code, _ in ended] == [250] * replies, ended
    return [text.decode().rpartition(" as ")[2] for _, text in ended]


def rawResponse(client, command):
    """
    What the server sends for a multi-line command, as on the wire
    (dot-stuffed, CRLF line ends), its status line and terminator left out.
    """
    client._putcmd(command)
    status = client.file.readline()
    assert status.startswith(b"+OK"), status
    lines = []
    while True:
        line = client.file.readline()
        assert line.endswith(b"\r\n"), line
        if line == b".\r\n":
            return b"".join(lines)
        lines.append(line)


def afterStatus(wire):
    """
    A multi-line response, its +OK status line taken off.
    """
    status, _, rest = wire.partition(b"\r\n")
    assert status.startswith(b"+OK"), wire
    return rest


def stuffed(octets):
    return re.sub(rb"(?m)^\.", b"..", octets)


def headerAndLines(message, n):
    """
    What TOP n gives of C{message}: its header, the empty line, and the
    first C{n} lines of its body.
    """
    header, _, body = message.partition(b"\r\n\r\n")
    return header + b"\r\n\r\n" + b"".join(line + b"\r\n" for line in body.split(b"\r\n")[:n] if n)


def checkCopy(server, user, uniqueIds):
    """
    What POP3 gives of each of C{user}'s messages, checked byte for byte
    against each other: RETR's octets (returned), LIST, TOP n 0 and TOP n
    3, the stuffed wire form and UIDL.
    """
    client = popLogin(server, user, PASSWORD)
    try:
        count, total = client.stat()
        messages = [retrieve(client, n) for n in range(1, count + 1)]
        sizes = [int(line.split()[1]) for line in client.list()[1]]
        assert sizes == [len(m) for m in messages] and total == sum(sizes), (sizes, messages)
        assert [line.split()[1].decode() for line in client.uidl()[1]] == uniqueIds
        for n, message in enumerate(messages, 1):
            assert rawResponse(client, f"RETR {n}") == stuffed(message)
            assert rawResponse(client, f"TOP {n} 0") == stuffed(headerAndLines(message, 0))
            assert rawResponse(client, f"TOP {n} 3") == stuffed(headerAndLines(message, 3))
        client.quit()
    finally:
        client.close()
    return messages


def split(copy):
    """
    A copy's own fields and the shared message after them (its
    Received: field first).
    """
    at = copy.index(b"Received: ")
    return copy[:at], copy[at:]


def ownFields(user):
    return b"Return-Path: <%s>\r\nDelivered-To: %s\r\n" % (SENDER.encode(), NAMED[user].encode())


@pytest.fixture
def server(mailgate_server, mailgate_cli):
    server = mailgate_server(
        "--lmtp", LISTEN, "--smtp", LISTEN, "--recipient-delimiter", "+", "--keep-deleted-days", "7",
        "--hostname", "mx.example.org",
    )
    for user in (ALICE, BOB):
        mailgate_cli.addUser(user, PASSWORD)
    mailgate_cli.check("alias", "add", ABUSE, BOB)
    return server


def test_eachCopyHasItsOwnDeliveredToAndOneBodyIsStored(server, mailgate_cli):
    """
    One message over LMTP and one over SMTP, each for alice (named
    alice+lists, in another case) and bob (named by his alias): each copy
    begins with its own Return-Path: and Delivered-To:, then the one
    Received: field and the message as sent; every POP3 view of it is
    exact; each message's body is stored once; DELE of one copy leaves
    the other whole.
    """
    ids = {ALICE: [], BOB: []}
    client = lmtp(server)
    alice, bob = send(client, replies=2)
    client.quit()
    ids[ALICE].append(alice)
    ids[BOB].append(bob)
    client = smtp(server)
    send(client, replies=1)
    client.quit()
    url = server.database
    ids[ALICE].append(mailgate_cli.mailbox(ALICE)[-1][2])
    ids[BOB].append(mailgate_cli.mailbox(BOB)[-1][2])
    copies = {user: checkCopy(server, user, ids[user]) for user in (ALICE, BOB)}
    for n, protocol in enumerate((b"LMTP", b"ESMTP")):
        shared = set()
        for user in (ALICE, BOB):
            own, rest = split(copies[user][n])
            assert own == ownFields(user), copies[user][n]
            assert rest.endswith(b"\r\n" + MESSAGE) and b" with %s id " % protocol in rest, rest
            # Several recipients: no "for" clause in the shared Received:.
            assert b"for <" not in rest
            shared.add(rest)
        assert len(shared) == 1
    # Stored once a message: two bodies for four copies, each held twice.
    assert query(url, "SELECT refcount FROM bodies") == [(2,), (2,)]
    assert len(query(url, "SELECT prefix FROM maildrop_prefixes")) == 4
    assert mailgateHere(url, "db", "check")[0] == 0

    client = popLogin(server, ALICE, PASSWORD)
    client.dele(1)
    client.quit()
    client = popLogin(server, ALICE, PASSWORD)
    assert retrieve(client, 1) == copies[ALICE][1]
    client.quit()
    assert checkCopy(server, BOB, ids[BOB]) == copies[BOB]
    # The deleted copy's fields went with it, kept for a restore.
    assert len(query(url, "SELECT prefix FROM maildrop_prefixes")) == 3
    assert query(url, "SELECT prefix FROM deleted_mail") == [(ownFields(ALICE),)]
    assert mailgateHere(url, "db", "check")[0] == 0


def test_restoreExportAndCopyKeepEachCopysFields(server, mailgate_cli, tmp_path, postgresURL):
    """
    A copy deleted and kept, then restored, reads as before (under a new
    uid, as every restore); an export writes each copy's octets; db copy
    to PostgreSQL (or from it) and back keeps them; db check calls it
    sound, and still finds a recorded size that is not the copy's.
    """
    client = lmtp(server)
    send(client, replies=2)
    client.quit()
    before = {user: checkCopy(server, user, [mailgate_cli.mailbox(user)[0][2]])[0] for user in (ALICE, BOB)}
    client = popLogin(server, BOB, PASSWORD)
    client.dele(1)
    client.quit()
    url = server.database
    assert query(url, "SELECT prefix FROM deleted_mail") == [(ownFields(BOB),)]
    mailgate_cli.check("mailbox", "restore", BOB)
    client = popLogin(server, BOB, PASSWORD)
    assert retrieve(client, 1) == before[BOB]
    client.quit()

    exported = tmp_path / "exported"
    mailgate_cli.check("mailbox", "export", ALICE, str(exported))
    (name,) = os.listdir(exported / "cur")
    assert (exported / "cur" / name).read_bytes() == before[ALICE]
    assert f",S={len(before[ALICE])}," in name
    # Imported back (a resumed import): the very message it holds under
    # that unique id, its own fields and all; not another one.
    out = mailgate_cli.check("import", "maildir", str(exported), ALICE)
    assert "1 skipped as already present" in out, out
    assert len(mailgate_cli.mailbox(ALICE)) == 1

    other = f"sqlite:///{tmp_path / 'other.sqlite3'}" if url.startswith("postgresql") else postgresURL
    back = f"sqlite:///{tmp_path / 'back.sqlite3'}"
    for source, target in ((url, other), (other, back)):
        code, out, err = mailgateHere(source, "db", "copy", "--from", source, "--to", target)
        assert code == 0, (out, err)
        store = openSynchronousStore(target)
        try:
            for user in (ALICE, BOB):
                session = POP3Session(store)
                assert session.login(user, PASSWORD).startswith("+OK")
                assert session.command("LIST 1") == f"+OK 1 {len(before[user])}\r\n"
                wire = session.send(b"RETR 1\r\n")
                assert wire == b"+OK %d octets\r\n" % len(before[user]) + stuffed(before[user]) + b".\r\n"
                session.command("QUIT")
        finally:
            store.close()
    assert mailgateHere(back, "db", "check")[0] == 0
    from databasefiles import byHand

    byHand(back, "UPDATE maildrop SET size = size - 1 WHERE user_id = (SELECT user_id FROM users WHERE address = ?)",
           ALICE)
    code, out, _ = mailgateHere(back, "db", "check")
    assert code != 0 and f"{ALICE}: message uid" in out and "of its own fields" in out, out


def test_deliveredToNoneWritesNone(mailgate_server, mailgate_cli):
    """
    --delivered-to none: the message as before this option, Return-Path:
    and Received: in the body stored once, and no copy's own fields.
    """
    server = mailgate_server("--lmtp", LISTEN, "--recipient-delimiter", "+", "--delivered-to", "none")
    for user in (ALICE, BOB):
        mailgate_cli.addUser(user, PASSWORD)
    mailgate_cli.check("alias", "add", ABUSE, BOB)
    client = lmtp(server)
    ids = send(client, replies=2)
    client.quit()
    copies = [checkCopy(server, user, [uid])[0] for user, uid in zip((ALICE, BOB), ids)]
    assert copies[0] == copies[1]
    assert copies[0].startswith(b"Return-Path: <%s>\r\nReceived: " % SENDER.encode()), copies[0]
    assert b"Delivered-To:" not in copies[0]
    assert query(server.database, "SELECT count(*) FROM maildrop_prefixes") == [(0,)]


def test_deliverWithASenderNamesEachRecipient(mailgate_cli, mailgate_server):
    """
    mailgate deliver --sender (an MTA's pipe transport): each recipient's
    copy gets its Delivered-To: after the Return-Path:, as Postfix's pipe
    flag D writes it; without --sender no trace field at all, as before.
    """
    for user in (ALICE, BOB):
        mailgate_cli.addUser(user, PASSWORD)
    mailgate_cli.check("alias", "add", ABUSE, BOB)
    url = mailgate_cli.database
    code, out, err = mailgateHere(url, "deliver", "--sender", SENDER, ALICE, ABUSE, stdin=MESSAGE.decode())
    assert code == 0, (out, err)
    code, out, err = mailgateHere(url, "deliver", ALICE, stdin=MESSAGE.decode())
    assert code == 0, (out, err)
    store = openSynchronousStore(url)
    try:
        got = {}
        for user in (ALICE, BOB):
            session = POP3Session(store)
            assert session.login(user, PASSWORD).startswith("+OK")
            got[user] = [session.send(b"RETR %d\r\n" % n) for n in (1, 2) if user == ALICE or n == 1]
            session.command("QUIT")
    finally:
        store.close()
    named = {ALICE: ALICE, BOB: ABUSE}
    for user in (ALICE, BOB):
        first = got[user][0]
        assert first.split(b"\r\n", 1)[1].startswith(
            b"Return-Path: <%s>\r\nDelivered-To: %s\r\nReceived: " % (SENDER.encode(), named[user].encode())
        ), first
    assert got[ALICE][1] == b"+OK %d octets\r\n" % len(MESSAGE) + stuffed(MESSAGE) + b".\r\n"


@sqliteOnly
def test_aReloadTurnsItOffForTheNextMessage(mailgate_server, mailgate_cli, tmp_path):
    """
    delivered-to is applied at SIGHUP, as the other settings of how mail
    is taken in: a file saying "none" after "final" (the default) gives
    the next message no Delivered-To:, and the log names the setting.
    """
    from test_reload_policy import configured, reload, writeConfig

    server, path = configured(mailgate_server, tmp_path, "--lmtp", LISTEN)
    mailgate_cli.addUser(ALICE, PASSWORD)

    def sendOne():
        client = lmtp(server)
        try:
            assert client.sendmail(SENDER, [ALICE], MESSAGE) == {}
        finally:
            client.quit()

    sendOne()
    writeConfig(path, delivered_to='"none"')
    line = reload(server)
    assert "applied" in line and "delivered-to" in line, server.log()
    sendOne()
    client = popLogin(server, ALICE, PASSWORD)
    first, second = retrieve(client, 1), retrieve(client, 2)
    client.quit()
    assert first.startswith(b"Return-Path: <%s>\r\nDelivered-To: %s\r\nReceived: " % (SENDER.encode(), ALICE.encode()))
    assert second.startswith(b"Return-Path: <%s>\r\nReceived: " % SENDER.encode()), second


def test_anOlderDatabasesMailReadsAsBefore(databaseURL):
    """
    Mail stored by the schema before (19), in the maildrop and kept
    deleted, reads octet for octet as before once the database is
    migrated, and restores as before.
    """
    from databasefiles import olderSchema, olderUser
    from mailgate.auth.passwords import makeCredentials
    from mailgate.testing import TEST_HASH_COST

    url = databaseURL
    olderSchema(url, version=19)
    old = b"Return-Path: <a@b.test>\r\nReceived: by old\r\nSubject: old\r\n\r\n.dot\r\nbody\r\n"
    header = old.index(b"\r\n\r\n") + 4

    def mail(cursor, userId):
        for uid, bodyId in ((1, "b1"), (2, "b2")):
            cursor.execute(
                "INSERT INTO bodies (owner_id, body_id, size, header_size, refcount, created_at) "
                "VALUES (?, ?, ?, ?, 1, 1700000000)",
                (userId, bodyId, len(old), header),
            )
            cursor.execute(
                "INSERT INTO body_chunks (owner_id, body_id, seq, data) VALUES (?, ?, 0, ?)", (userId, bodyId, old)
            )
        cursor.execute(
            "INSERT INTO maildrop (user_id, uid, uidl, body_owner, body_id, size, header_size, arrived_at) "
            "VALUES (?, 1, 'old-1', ?, 'b1', ?, ?, 1700000000)",
            (userId, userId, len(old), header),
        )
        cursor.execute(
            "INSERT INTO deleted_mail (user_id, uid, uidl, body_owner, body_id, size, header_size, arrived_at, "
            "deleted_at, deleted_by) VALUES (?, 2, 'old-2', ?, 'b2', ?, ?, 1700000000, 1700000001, 'test')",
            (userId, userId, len(old), header),
        )
        cursor.execute(
            "UPDATE mailboxes SET next_uid = 3, used_octets = ?, used_messages = 1 WHERE user_id = ?",
            (len(old), userId),
        )

    olderUser(url, ALICE, makeCredentials(PASSWORD, logN=TEST_HASH_COST), then=mail)
    store = openSynchronousStore(url)
    try:
        assert store.database.run(currentVersion) == LATEST
    finally:
        store.close()
    code, out, err = mailgateHere(url, "mailbox", "restore", ALICE)
    assert code == 0, (out, err)
    store = openSynchronousStore(url)
    try:
        session = POP3Session(store)
        assert session.login(ALICE, PASSWORD).startswith("+OK")
        listed = session.command("LIST")
        assert listed == f"+OK 2 messages ({2 * len(old)} octets)\r\n1 {len(old)}\r\n2 {len(old)}\r\n.\r\n"
        for n in (1, 2):
            assert session.send(b"RETR %d\r\n" % n) == b"+OK %d octets\r\n" % len(old) + stuffed(old) + b".\r\n"
            assert afterStatus(session.send(b"TOP %d 0\r\n" % n)) == old[:header] + b".\r\n"
        session.command("QUIT")
    finally:
        store.close()
    assert mailgateHere(url, "db", "check")[0] == 0


def test_aPrefixedCopyIsOneMessageToTheStore(tmp_path):
    """
    In process, on the store a POP3 session reads: a copy with its own
    fields is one message whatever way it is opened (read ahead with
    others for RETR, for TOP n 0 alone or after RETR's read-ahead, a
    message larger than a chunk): sizes, header size, dot offsets and
    the octets all the copy's; the copy without fields (another user's
    of the same body, with none) the body as it is.
    """
    from mailgate.store.reads import CHUNK_SIZE

    store = openSynchronousStore(f"sqlite:///{tmp_path / 'mail.sqlite3'}")
    try:
        for user in (ALICE, BOB):
            addUser(store, user, PASSWORD)
        large = MESSAGE + b".x" * (CHUNK_SIZE // 2) + b"\r\n.end\r\n"
        for body in (MESSAGE, large):
            spool = spoolBytes(body)
            spool.copyPrefixes = {ALICE: ownFields(ALICE)}
            try:
                resultOf(store.deliver([ALICE, BOB], spool))
            finally:
                spool.close()
        for user, prefix in ((ALICE, ownFields(ALICE)), (BOB, b"")):
            session = POP3Session(store)
            assert session.login(user, PASSWORD).startswith("+OK")
            for n, body in ((1, MESSAGE), (2, large)):
                copy = prefix + body
                assert session.command(f"LIST {n}") == f"+OK {n} {len(copy)}\r\n"
                top = afterStatus(session.send(b"TOP %d 0\r\n" % n))
                assert top == stuffed(headerAndLines(copy, 0)) + b".\r\n"
                wire = session.send(b"RETR %d\r\n" % n)
                for _ in range(20):
                    if wire.endswith(b"\r\n.\r\n"):
                        break
                    wire += session.advance(0)
                assert wire == b"+OK %d octets\r\n" % len(copy) + stuffed(copy) + b".\r\n"
                top = afterStatus(session.send(b"TOP %d 3\r\n" % n))
                assert top == stuffed(headerAndLines(copy, 3)) + b".\r\n"
            session.command("DELE 1")
            session.command("QUIT")
        # Deleted (none kept): alice's first copy's fields with it, the
        # second's left; the body that bob's copy held gone with it.
        rows = store.database.run(
            lambda cursor: cursor.execute("SELECT uid FROM maildrop_prefixes").fetchall()
        )
        assert rows == [(2,)]
        assert store.database.run(lambda cursor: cursor.execute("SELECT count(*) FROM bodies").fetchall()) == [(1,)]
    finally:
        store.close()


def test_dbCheckFindsFieldsOfNoMessage(tmp_path):
    """
    A copy's own fields left behind by hand (their message removed with
    SQL): db check names them, as the storage nothing uses they are; the
    copies with their message are sound.
    """
    from databasefiles import byHand

    url = f"sqlite:///{tmp_path / 'mail.sqlite3'}"
    store = openSynchronousStore(url)
    try:
        addUser(store, ALICE, PASSWORD)
        spool = spoolBytes(MESSAGE)
        spool.copyPrefixes = {ALICE: ownFields(ALICE)}
        try:
            resultOf(store.deliver([ALICE], spool))
        finally:
            spool.close()
    finally:
        store.close()
    assert mailgateHere(url, "db", "check")[0] == 0
    byHand(url, "INSERT INTO maildrop_prefixes (user_id, uid, prefix) SELECT user_id, 99, prefix FROM maildrop_prefixes")
    code, out, _ = mailgateHere(url, "db", "check")
    assert code != 0 and "fields of a copy (Delivered-To:) for uid 99, no such message" in out, out
