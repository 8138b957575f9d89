"""
Several mailgate nodes on one PostgreSQL database: real C{twistd mailgate}
processes on different ports sharing one schema, driven by real clients
(smtplib, poplib, raw sockets) over 127.0.0.1.

What a user must not be able to tell: which node took the mail in and which
one serves it (byte for byte, apart from the trace headers the receiving
node prepends); that POP3's one-session-per-maildrop rule holds across
nodes, and a node killed outright does not keep a maildrop locked beyond
the documented bound (L{mailgate.store.postgres.LOCK_RELEASE_BOUND}) nor
lose or delete anything; that unique ids stay unique whatever node
delivered; that the database going away and coming back is a temporary
failure, not a crash.  Plus HAProxy's PROXY protocol in front of a node:
the plaintext policy applies to the client behind the balancer.

Every wait is bounded; the only time limit asserted is the lock bound,
as the deadline of a poll.
"""

import os
import poplib
import re
import shlex
import smtplib
import subprocess
import threading

import pytest

from e2e import (  # noqa: F401 (mailgate_server is a fixture)
    DEADLINE,
    LineReader,
    connect,
    mailgate_cli,
    mailgate_server,
    pop,
    popLogin as login,
    postgresOnly,
    retrieve,
    waitFor,
)
from mailgate.store.postgres import LOCK_RELEASE_BOUND

pytestmark = postgresOnly

ALICE = "alice@example.org"
BOB = "bob@example.org"
ALICE_PW = "wonder land"
BOB_PW = "builder"
SENDER = "sender@example.net"
FAST_FAILURES = ("--auth-failure-delay", "0.2")


_TRACE = re.compile(
    rb"Return-Path: <[^\r\n]*>\r\nDelivered-To: [^\r\n]*\r\nReceived: from [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*\Z"
)


def node(mailgate_server, name, *options):
    """
    A node: a C{twistd mailgate} with POP3 and SMTP listeners of its own,
    on the test's PostgreSQL schema.
    """
    return mailgate_server(
        "--hostname", f"{name}.test", "--smtp", "tcp:0:interface=127.0.0.1", *FAST_FAILURES, *options
    )


def smtp(server):
    client = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE)
    code, _ = client.ehlo("client.test")
    assert code == 250
    return client


def send(server, recipients, message):
    """
    One SMTP transaction through C{server}; fails unless every step is
    accepted.
    """
    client = smtp(server)
    try:
        refused = client.sendmail(SENDER, recipients, message, mail_options=["BODY=8BITMIME"])
        assert refused == {}
    finally:
        client.quit()


def refusedLogin(server, address, password):
    """
    A login that must fail: the -ERR line it got.
    """
    client = pop(server)
    try:
        client.user(address)
        with pytest.raises(poplib.error_proto) as failure:
            client.pass_(password)
        return failure.value.args[0]
    finally:
        client.close()


def uidl(client):
    return [line.split()[1].decode() for line in client.uidl()[1]]


def message(subject, body=b"hello\r\n"):
    return b"From: " + SENDER.encode() + b"\r\nSubject: " + subject.encode() + b"\r\n\r\n" + body


def subjectOf(client, number):
    status, lines, _ = client.top(number, 0)
    for line in lines:
        if line.startswith(b"Subject: "):
            return line[len(b"Subject: "):].decode()
    raise AssertionError(f"message {number} has no Subject: {lines}")


# -- SMTP on one node, POP3 on the other ----------------------------------


def test_smtpIntoOneNodePop3FromTheOther(mailgate_server, mailgate_cli):
    mailgate_cli.addUser(ALICE, ALICE_PW)
    a = node(mailgate_server, "node-a")
    b = node(mailgate_server, "node-b")
    # Awkward content: lines starting with dots, 8-bit octets, a body
    # larger than one storage chunk.
    body = b"".join(
        (b"." if n % 5 == 0 else b"") + b"line %05d " % n + bytes(range(0xA0, 0x100)) + b"\r\n"
        for n in range(2000)
    ) + b".\r\n..\r\nend\r\n"
    sent = message("across nodes", body)
    assert len(sent) > 128 * 1024
    send(a, [ALICE], sent)

    client = login(b, ALICE, ALICE_PW)
    assert client.stat()[0] == 1
    received = retrieve(client, 1)
    client.quit()
    assert received.endswith(sent)
    trace = received[: -len(sent)]
    assert _TRACE.match(trace), trace
    assert trace.startswith(b"Return-Path: <" + SENDER.encode() + b">\r\n")
    assert b"by node-a.test (mailgate)" in trace  # node A took it in
    # The admin command agrees on the size.
    [(number, octets, _)] = mailgate_cli.mailbox(ALICE)
    assert (number, octets) == (1, len(received))


# -- one session per maildrop, across nodes -------------------------------


def test_maildropLockHoldsAcrossNodes(mailgate_server, mailgate_cli):
    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.addUser(BOB, BOB_PW)
    mailgate_cli.deliver(ALICE, message("locked"))
    a = node(mailgate_server, "node-a")
    b = node(mailgate_server, "node-b")

    for first, second in [(a, b), (b, a)]:
        holder = login(first, ALICE, ALICE_PW)
        assert refusedLogin(second, ALICE, ALICE_PW).startswith(b"-ERR [IN-USE]")
        # Another user's maildrop is not affected.
        other = login(second, BOB, BOB_PW)
        assert other.quit().startswith(b"+OK")
        assert holder.stat()[0] == 1  # the holder is unaffected
        assert holder.quit().startswith(b"+OK")
        client = login(second, ALICE, ALICE_PW)
        assert client.stat()[0] == 1
        assert client.quit().startswith(b"+OK")


def test_loginRightAfterQuitOnTheOtherNode(mailgate_server, mailgate_cli):
    """
    The +OK to QUIT means the session is over (README: the lock is released
    on QUIT): a client that then logs in through another node, at once (as
    behind a load balancer), gets in.  Tried a number of times, both ways
    round, with the next client's USER already answered so that its PASS
    follows the +OK as closely as a client can.  (The failure this guards
    against is a race: it showed in 0.5 to 5 per cent of the rounds.)
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.deliver(ALICE, message("locked"))
    a = node(mailgate_server, "node-a")
    b = node(mailgate_server, "node-b")
    rounds = 1000
    refused = []
    for i in range(rounds):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        # (The previous round's session on this node may itself still be
        # ending: wait for the lock, that is not what is tested here.)
        holder = waitFor(lambda: _tryLogin(first), "the maildrop lock to be free")
        with connect(second.port) as sock:
            reader = LineReader(sock)
            assert reader.line().startswith(b"+OK")
            sock.sendall(f"USER {ALICE}\r\n".encode())
            assert reader.line().startswith(b"+OK")
            assert holder.quit().startswith(b"+OK")
            sock.sendall(f"PASS {ALICE_PW}\r\nQUIT\r\n".encode())
            reply = reader.line()
            if reply.startswith(b"+OK"):
                assert reader.line().startswith(b"+OK")  # QUIT
            else:
                refused.append((i, reply))
                if len(refused) == 5 or not reply.startswith(b"-ERR [IN-USE]"):
                    break  # enough to show it
    assert refused == [], (
        f"{len(refused)} of {i + 1} logins right after QUIT on the other node were refused: "
        f"{refused[:3]}"
    )


def _tryLogin(server):
    """
    A logged-in client, or None if the maildrop is locked.
    """
    client = pop(server)
    try:
        client.user(ALICE)
        client.pass_(ALICE_PW)
    except poplib.error_proto as e:
        client.close()
        if e.args[0].startswith(b"-ERR [IN-USE]"):
            return None
        raise
    return client


def test_killedNodeReleasesItsLocksAndLosesNothing(mailgate_server, mailgate_cli):
    """
    SIGKILL of the node holding a maildrop lock, in the middle of a session
    that marked messages for deletion: the other node lets the user in
    within the documented bound, with every message still there.
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    uids = [mailgate_cli.deliver(ALICE, message(f"m{i}")) for i in range(3)]
    a = node(mailgate_server, "node-a")
    b = node(mailgate_server, "node-b")

    client = login(a, ALICE, ALICE_PW)
    assert retrieve(client, 1).endswith(message("m0"))
    assert client.dele(1).startswith(b"+OK")
    assert client.dele(2).startswith(b"+OK")
    assert client.stat()[0] == 1
    assert refusedLogin(b, ALICE, ALICE_PW).startswith(b"-ERR [IN-USE]")

    a.process.kill()
    a.process.wait(DEADLINE)
    client.close()

    def attempt():
        other = pop(b)
        try:
            other.user(ALICE)
            other.pass_(ALICE_PW)
        except poplib.error_proto as e:
            other.close()
            if e.args[0].startswith(b"-ERR [IN-USE]"):
                return None
            raise
        return other

    client = waitFor(attempt, "node B to get the lock of the killed node A", timeout=LOCK_RELEASE_BOUND)
    assert client.stat()[0] == 3
    assert uidl(client) == uids
    assert retrieve(client, 2).endswith(message("m1"))
    assert client.quit().startswith(b"+OK")
    assert [row[2] for row in mailgate_cli.mailbox(ALICE)] == uids
    assert b.running(), b.log()


# -- unique ids, whichever node delivered ---------------------------------


def test_uniqueIdsAreUniqueWhicheverNodeDelivered(mailgate_server, mailgate_cli):
    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.addUser(BOB, BOB_PW)
    a = node(mailgate_server, "node-a")
    b = node(mailgate_server, "node-b")
    expected = {ALICE: [], BOB: []}

    # Interleaved, one after the other.
    for i in range(6):
        recipients = [ALICE, BOB] if i % 3 == 0 else [ALICE]
        subject = f"serial {i}"
        send((a, b)[i % 2], recipients, message(subject))
        for r in recipients:
            expected[r].append(subject)

    # Concurrent SMTP sessions on both nodes, several transactions each.
    per = 12
    barrier = threading.Barrier(2)
    errors = []

    def sender(server, name):
        try:
            client = smtp(server)
            barrier.wait(DEADLINE)
            for i in range(per):
                refused = client.sendmail(SENDER, [ALICE, BOB], message(f"{name} {i}"))
                assert refused == {}
            client.quit()
        except Exception as e:  # reported below, with the others
            errors.append(f"{name}: {e!r}")

    threads = [threading.Thread(target=sender, args=(s, n)) for s, n in ((a, "via-a"), (b, "via-b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE * 3)
    assert not any(t.is_alive() for t in threads), "an SMTP sender hung"
    assert errors == []
    for name in ("via-a", "via-b"):
        for i in range(per):
            expected[ALICE].append(f"{name} {i}")
            expected[BOB].append(f"{name} {i}")

    for address, password in ((ALICE, ALICE_PW), (BOB, BOB_PW)):
        views = []
        for server in (a, b):
            client = login(server, address, password)
            ids = uidl(client)
            subjects = [subjectOf(client, n) for n in range(1, len(ids) + 1)]
            client.quit()
            views.append(list(zip(ids, subjects)))
        # Both nodes list the same messages with the same ids...
        assert views[0] == views[1]
        ids = [uid for uid, _ in views[0]]
        # ...every message delivered is there exactly once...
        assert sorted(s for _, s in views[0]) == sorted(expected[address])
        # ...and no two messages share a unique id.
        assert len(set(ids)) == len(ids), ids
        assert [row[2] for row in mailgate_cli.mailbox(address)] == ids


# -- deletion on one node, seen by the other ------------------------------


def test_deletionAtQuitIsVisibleOnTheOtherNode(mailgate_server, mailgate_cli):
    mailgate_cli.addUser(ALICE, ALICE_PW)
    uids = [mailgate_cli.deliver(ALICE, message(f"m{i}")) for i in range(3)]
    a = node(mailgate_server, "node-a")
    b = node(mailgate_server, "node-b")

    client = login(a, ALICE, ALICE_PW)
    assert client.dele(2).startswith(b"+OK")
    assert client.quit().startswith(b"+OK")

    client = login(b, ALICE, ALICE_PW)
    assert client.stat()[0] == 2
    assert uidl(client) == [uids[0], uids[2]]
    assert client.dele(1).startswith(b"+OK")
    assert client.quit().startswith(b"+OK")

    client = login(a, ALICE, ALICE_PW)
    assert uidl(client) == [uids[2]]
    assert retrieve(client, 1).endswith(message("m2"))
    assert client.quit().startswith(b"+OK")


def _liveNodes(database):
    import psycopg

    from mailgate.store.postgres import _conninfo

    with psycopg.connect(_conninfo(database), autocommit=True) as conn:
        return [row[0] for row in conn.execute("SELECT name FROM mailgate_nodes WHERE settings IS NOT NULL")]


def test_nodesThatDifferInRetentionSaySoAndKeepWhatTheOtherKeeps(mailgate_server, mailgate_cli):
    """
    Node A keeps deleted mail a week; node B, whose configuration was not
    updated, keeps none: B's log names the option, both values and node A,
    and a message a POP3 client deletes through B is kept for recovery,
    as A would keep it.
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    uids = [mailgate_cli.deliver(ALICE, message(f"m{i}")) for i in range(2)]
    a = node(mailgate_server, "node-a", "--keep-deleted-days", "7")
    waitFor(lambda: any(name.startswith("node-a.test[") for name in _liveNodes(a.database)), "node A's heartbeat")
    b = node(mailgate_server, "node-b")
    waitFor(
        lambda: re.search(r"--keep-deleted-days 0 here, 7 on node-a\.test\[\d+\]", b.log()),
        "node B's warning",
    )
    assert "node-b.test[" in " ".join(_liveNodes(a.database))
    listed = mailgate_cli.check("nodes")
    # The last column, each node's clock against the database server's:
    # "-" until the node has measured it and said so with a heartbeat.
    assert re.search(r"^node-a\.test\[\d+\] .* 7 temporary +none +none +86400 +(-|[+-]\d+\.\ds)$", listed, re.M), listed
    assert re.search(r"^node-b\.test\[\d+\] .* 0 temporary +none +none +86400 +(-|[+-]\d+\.\ds)$", listed, re.M), listed
    assert "the nodes differ in --keep-deleted-days:" in listed
    client = login(b, ALICE, ALICE_PW)
    assert client.dele(1).startswith(b"+OK")
    assert client.quit().startswith(b"+OK")
    deleted = mailgate_cli.check("mailbox", "deleted", ALICE)
    assert uids[0] in deleted and uids[1] not in deleted


# -- the database goes away and comes back --------------------------------


def _control(variable):
    command = os.environ.get(variable)
    if not command:
        pytest.fail(
            f"{variable} is not set: run the suite with `make test` (tests/pgserver.py sets it)",
            pytrace=False,
        )
    done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"


def _databaseIsUp(url):
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _popLogin(server, address, password):
    """
    The reply to PASS over a raw socket (the session is then closed).
    """
    with connect(server.port) as sock:
        reader = LineReader(sock)
        assert reader.line().startswith(b"+OK")
        sock.sendall(f"USER {address}\r\n".encode())
        assert reader.line().startswith(b"+OK")
        sock.sendall(f"PASS {password}\r\n".encode())
        reply = reader.line()
        sock.sendall(b"QUIT\r\n")
        return reply


def _smtpAttempt(server, recipient, data=None):
    """
    One SMTP transaction; returns the (code, text) of RCPT, or of DATA's
    end if RCPT was accepted and there is C{data}.
    """
    client = smtp(server)
    try:
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt(recipient)
        if code != 250 or data is None:
            return code, text
        return client.data(data)
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            pass


@pytest.mark.serial
def test_databaseRestartUnderARunningNode(mailgate_server, mailgate_cli):
    """
    While PostgreSQL is down, POP3 logins and SMTP deliveries are told to
    try again later; once it is back, the same process serves again.

    This stops and restarts the suite's shared PostgreSQL server; it is
    always started again, whatever happens.  Marked serial: C{make test}
    runs it alone, as every other test using PostgreSQL would fail while
    the server is down.
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.addUser(BOB, BOB_PW)
    mailgate_cli.deliver(ALICE, message("before"))
    server = node(mailgate_server, "node-a")
    pid = server.process.pid
    url = server.database

    # Every piece of the node has touched the database once.
    assert _popLogin(server, ALICE, ALICE_PW).startswith(b"+OK")
    send(server, [ALICE], message("while up"))
    # An SMTP transaction whose recipient was accepted while the database
    # was up, and whose data ends while it is down.
    pending = smtp(server)
    assert pending.mail(SENDER)[0] == 250
    assert pending.rcpt(ALICE)[0] == 250

    _control("MAILGATE_TEST_POSTGRES_STOP")
    try:
        assert not _databaseIsUp(url)
        reply = _popLogin(server, ALICE, ALICE_PW)
        assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
        code, text = pending.data(message("while down"))
        assert (code, text[:5]) == (451, b"4.3.0"), (code, text)
        pending.quit()
        # A recipient this node has not seen yet cannot be looked up.
        code, text = _smtpAttempt(server, BOB)
        assert (code, text[:5]) == (451, b"4.3.0"), (code, text)
        # One it has seen may be accepted from memory at RCPT; then the
        # data cannot be stored.  Either way: 451, try again later.
        code, text = _smtpAttempt(server, ALICE, message("while down, again"))
        assert (code, text[:5]) == (451, b"4.3.0"), (code, text)
        assert server.running(), server.log()
    finally:
        _control("MAILGATE_TEST_POSTGRES_START")
        waitFor(lambda: _databaseIsUp(url), "PostgreSQL to accept connections again", timeout=60)

    # The same process serves again, without a restart.  Its connections
    # died with the server: the first attempts may still fail, temporarily.
    def loggedIn():
        reply = _popLogin(server, ALICE, ALICE_PW)
        if reply.startswith(b"-ERR [SYS/TEMP]"):
            return None
        return reply

    reply = waitFor(loggedIn, "a POP3 login after the database restart", timeout=DEADLINE * 2, interval=0.2)
    assert reply.startswith(f"+OK {ALICE} has 2 messages".encode()), reply

    def delivered():
        code, text = _smtpAttempt(server, ALICE, message("after"))
        if code == 451:
            return None
        return code, text

    code, text = waitFor(delivered, "an SMTP delivery after the database restart", timeout=DEADLINE * 2, interval=0.2)
    assert code == 250, text
    assert server.running() and server.process.pid == pid

    client = login(server, ALICE, ALICE_PW)
    assert [subjectOf(client, n) for n in (1, 2, 3)] == ["before", "while up", "after"]
    client.quit()


# -- HAProxy's PROXY protocol ---------------------------------------------


def _proxiedSession(port, claimed):
    """
    A connection to a PROXY-protocol listener that says (PROXY v1) it
    relays a client at C{claimed}:40001; returns the socket, its reader and
    the greeting.
    """
    sock = connect(port)
    sock.sendall(b"PROXY TCP4 %s 127.0.0.1 40001 %d\r\n" % (claimed.encode(), port))
    reader = LineReader(sock)
    return sock, reader, reader.line()


def test_haproxyProtocolClientAddressDecidesThePlaintextPolicy(mailgate_server, mailgate_cli):
    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.deliver(ALICE, message("behind the balancer"))
    server = node(
        mailgate_server,
        "node-a",
        "--pop3", "haproxy:tcp:0:interface=127.0.0.1",
        "--trusted-network", "203.0.113.0/24",
    )
    match = re.search(r"POP3 listening on 127\.0\.0\.1:(\d+) \(haproxy:", server.stdout)
    assert match, server.log()
    port = int(match.group(1))

    # A client on the trusted network, behind the balancer: plaintext
    # logins are fine.
    sock, reader, greeting = _proxiedSession(port, "203.0.113.9")
    with sock:
        assert greeting.startswith(b"+OK"), greeting
        sock.sendall(f"USER {ALICE}\r\n".encode())
        assert reader.line().startswith(b"+OK")
        sock.sendall(f"PASS {ALICE_PW}\r\n".encode())
        assert reader.line().startswith(f"+OK {ALICE} has 1 messages".encode())
        sock.sendall(b"STAT\r\nQUIT\r\n")
        assert reader.line().startswith(b"+OK 1 ")
        assert reader.line().startswith(b"+OK")
    waitFor(
        lambda: re.search(rf"pop3 logout user={re.escape(ALICE)} peer=203\.0\.113\.9:40001\b", server.stdout),
        "the session to be logged with the client's address",
    )

    # A client elsewhere, through the same balancer (the same TCP peer,
    # 127.0.0.1): no plaintext password without TLS.
    refused = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections\r\n"
    sock, reader, greeting = _proxiedSession(port, "198.51.100.9")
    with sock:
        assert greeting.startswith(b"+OK"), greeting
        sock.sendall(f"USER {ALICE}\r\n".encode())
        assert reader.line() == refused
        sock.sendall(f"PASS {ALICE_PW}\r\n".encode())
        assert reader.line() == refused
        sock.sendall(b"STAT\r\n")
        assert reader.line().startswith(b"-ERR")  # not logged in
        sock.sendall(b"QUIT\r\n")
        assert reader.line().startswith(b"+OK")
    assert "peer=198.51.100.9" not in "".join(
        line for line in server.stdout.splitlines(True) if "pop3 logout user=" in line
    )
