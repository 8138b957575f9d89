"""
Connection limits and bans end to end: a real C{twistd mailgate} with
C{--exempt-network none}, real clients (poplib, smtplib, raw sockets)
bound to different loopback addresses (127.0.0.2, 127.0.0.3: all of
127.0.0.0/8 is loopback), the real C{mailgate ban} command.

What a user sees: the address that failed too often is refused at once
(POP3 C{-ERR [SYS/TEMP]}, SMTP C{421 4.7.0}) while another logs in; a
session opened before the ban cannot log in even with the right password;
C{ban del} lets it in again, C{ban add} shuts it out, within the seconds
the README promises; two nodes on one PostgreSQL share a ban; a restarted
SQLite server keeps it; too many connections from one address, or in all,
are refused.

These rely on the session core calling the policy
(L{mailgate.interfaces.IConnectionPolicy}) from POP3, SMTP and LMTP.
Every wait is bounded (L{DEADLINE}); no time is asserted.
"""

import itertools
import poplib
import smtplib
import socket

import pytest
from test_sasl import plain

from e2e import (  # noqa: F401 (mailgate_server, mailgate_cli are fixtures)
    DEADLINE,
    BoundPOP3,
    LineReader,
    mailgate_cli,
    mailgate_server,
    postgresOnly,
    sqliteOnly,
    waitFor,
)

ALICE = "alice@example.org"
PASSWORD = "wonder land"
WRONG = "not the password"
ATTACKER = "127.0.0.2"
USER = "127.0.0.3"

# Bans after three failures; no delays to wait through.
STRICT = (
    "--exempt-network", "none",
    "--ban-after", "3",
    "--auth-failure-delay", "0",
    "--auth-penalty-max", "0",
    "--smtp", "tcp:0:interface=127.0.0.1",
)


def rawConnection(port, source):
    sock = socket.create_connection(("127.0.0.1", port), DEADLINE, source_address=(source, 0))
    return sock, LineReader(sock)


def login(server, source, password=PASSWORD):
    client = BoundPOP3(server.port, source)
    client.user(ALICE)
    client.pass_(password)
    return client


_guesses = itertools.count()


def failLogin(server, source, password=None):
    """
    A failed USER/PASS login from C{source}: a new wrong password each
    time, as a guesser sends (the same one again is not counted again).
    """
    client = BoundPOP3(server.port, source)
    try:
        client.user(ALICE)
        with pytest.raises(poplib.error_proto) as failure:
            client.pass_(password or f"{WRONG} {next(_guesses)}")
        assert failure.value.args[0].startswith(b"-ERR")
    finally:
        client.close()


def pop3Refused(server, source):
    """
    The line a POP3 connection from C{source} is refused with, after which
    the server closed it; C{None} if it was greeted instead.
    """
    sock, reader = rawConnection(server.port, source)
    try:
        line = reader.line()
        if line.startswith(b"+OK"):
            return None
        assert reader.closed(), line
        return line
    finally:
        sock.close()


def smtpRefused(server, source):
    """
    The SMTP refusal (code, text) of a connection from C{source}; C{None}
    if it was greeted.
    """
    client = smtplib.SMTP(timeout=DEADLINE, source_address=(source, 0))
    code, text = client.connect("127.0.0.1", server.portOf("SMTP"))
    if code != 220:
        client.close()
        return code, text
    client.quit()
    return None


def banned(server, source):
    line = pop3Refused(server, source)
    return line is not None and line.startswith(b"-ERR [SYS/TEMP]")


def admitted(server, source):
    return pop3Refused(server, source) is None


def banList(cli):
    return {line.split()[0]: line.split()[1:] for line in cli.check("ban", "list").splitlines()[1:]}


@sqliteOnly
def test_bannedAddressIsRefusedWhileAnotherLogsIn(mailgate_server, mailgate_cli):
    server = mailgate_server(*STRICT)
    mailgate_cli.addUser(ALICE, PASSWORD)
    # A session the attacker opened before it was banned.
    early = BoundPOP3(server.port, ATTACKER)
    for _ in range(3):
        failLogin(server, ATTACKER)

    line = pop3Refused(server, ATTACKER)
    assert line is not None and line.startswith(b"-ERR [SYS/TEMP]"), line
    code, text = smtpRefused(server, ATTACKER)
    assert code == 421 and text.startswith(b"4.7.0"), (code, text)
    # Even the right password does not get in from the banned address.
    early.user(ALICE)
    with pytest.raises(poplib.error_proto):
        early.pass_(PASSWORD)
    early.close()

    # Another address is not held up.
    client = login(server, USER)
    assert client.stat() == (0, 0)
    client.quit()
    assert smtpRefused(server, USER) is None

    assert banList(mailgate_cli)[ATTACKER][:2] == ["auth-failures", "3"]


@sqliteOnly
def test_aClientWithAnOldPasswordIsNotBannedForRepeatingIt(mailgate_server, mailgate_cli):
    """
    A phone left with the password from before a change polls with it,
    again and again: it guesses nothing, and must not get its address
    (perhaps a whole office's) banned.  A guesser still is.
    """
    server = mailgate_server(*STRICT)
    mailgate_cli.addUser(ALICE, PASSWORD)
    for _ in range(10):
        failLogin(server, ATTACKER, password="the password before the change")
        client = BoundPOP3(server.port, ATTACKER)
        # SASL PLAIN carries the password too: the same one again.
        with pytest.raises(poplib.error_proto) as failure:
            client._shortcmd("AUTH PLAIN " + plain(ALICE, "the password before the change"))
        assert failure.value.args[0].startswith(b"-ERR [AUTH]"), failure.value
        client.close()
    assert admitted(server, ATTACKER)
    login(server, ATTACKER).quit()
    # The old password counted once; two guesses make the third failure.
    failLogin(server, ATTACKER)
    assert admitted(server, ATTACKER)
    failLogin(server, ATTACKER)
    assert banned(server, ATTACKER)


@sqliteOnly
def test_banDelLetsTheAddressInAgain(mailgate_server, mailgate_cli):
    server = mailgate_server(*STRICT)
    mailgate_cli.addUser(ALICE, PASSWORD)
    for _ in range(3):
        failLogin(server, ATTACKER)
    assert banned(server, ATTACKER)
    mailgate_cli.check("ban", "del", ATTACKER)
    waitFor(lambda: admitted(server, ATTACKER), "the server to honour ban del")
    login(server, ATTACKER).quit()
    assert ATTACKER not in banList(mailgate_cli)


@sqliteOnly
def test_banAddShutsTheAddressOut(mailgate_server, mailgate_cli):
    server = mailgate_server(*STRICT)
    mailgate_cli.addUser(ALICE, PASSWORD)
    login(server, ATTACKER).quit()
    mailgate_cli.check("ban", "add", ATTACKER, "--for", "600")
    waitFor(lambda: banned(server, ATTACKER), "the server to honour ban add")
    assert admitted(server, USER)


@sqliteOnly
def test_restartKeepsBans(mailgate_server, mailgate_cli):
    server = mailgate_server(*STRICT)
    mailgate_cli.addUser(ALICE, PASSWORD)
    for _ in range(3):
        failLogin(server, ATTACKER)
    assert banned(server, ATTACKER)
    server.stop()
    again = mailgate_server(*STRICT)
    waitFor(lambda: banned(again, ATTACKER), "the restarted server to enforce the ban")
    login(again, USER).quit()


@sqliteOnly
def test_loopbackIsExemptByDefault(mailgate_server, mailgate_cli):
    server = mailgate_server(
        "--ban-after", "3", "--auth-failure-delay", "0", "--max-connections-per-ip", "2"
    )
    mailgate_cli.addUser(ALICE, PASSWORD)
    for _ in range(5):
        failLogin(server, ATTACKER)
    held = [rawConnection(server.port, ATTACKER) for _ in range(3)]
    try:
        login(server, ATTACKER).quit()
    finally:
        for sock, _ in held:
            sock.close()
    assert banList(mailgate_cli) == {}


@sqliteOnly
def test_connectionsPerAddressAreLimited(mailgate_server, mailgate_cli):
    server = mailgate_server(*STRICT, "--max-connections-per-ip", "2")
    held = []
    try:
        for _ in range(2):
            sock, reader = rawConnection(server.port, ATTACKER)
            held.append(sock)
            assert reader.line().startswith(b"+OK")
        line = pop3Refused(server, ATTACKER)
        assert line == b"-ERR [SYS/TEMP] service temporarily unavailable: too many connections; try again later\r\n", line
        code, text = smtpRefused(server, ATTACKER)
        assert code == 421 and text.startswith(b"4.7.0") and b"too many connections" in text
        # Another address is not limited by this one's connections.
        assert admitted(server, USER)
        held.pop().close()
        waitFor(lambda: admitted(server, ATTACKER), "a closed connection to be uncounted")
    finally:
        for sock in held:
            sock.close()


@sqliteOnly
def test_connectionsInAllAreLimited(mailgate_server, mailgate_cli):
    server = mailgate_server(*STRICT, "--max-connections", "2")
    held = []
    try:
        for source in (ATTACKER, USER):
            sock, reader = rawConnection(server.port, source)
            held.append(sock)
            assert reader.line().startswith(b"+OK")
        line = pop3Refused(server, "127.0.0.4")
        assert line == b"-ERR [SYS/TEMP] service temporarily unavailable: too many connections; try again later\r\n", line
    finally:
        for sock in held:
            sock.close()


def node(mailgate_server, name):
    return mailgate_server("--hostname", f"{name}.test", *STRICT)


@postgresOnly
def test_twoNodesShareABan(mailgate_server, mailgate_cli):
    a = node(mailgate_server, "a")
    b = node(mailgate_server, "b")
    mailgate_cli.addUser(ALICE, PASSWORD)
    assert admitted(b, ATTACKER)
    for _ in range(3):
        failLogin(a, ATTACKER)
    assert banned(a, ATTACKER)
    waitFor(lambda: banned(b, ATTACKER), "node b to enforce node a's ban")
    code, _ = smtpRefused(b, ATTACKER)
    assert code == 421
    login(b, USER).quit()
    # Lifted once, for every node.
    mailgate_cli.check("ban", "del", ATTACKER)
    for server in (a, b):
        waitFor(lambda: admitted(server, ATTACKER), "every node to honour ban del")
    login(b, ATTACKER).quit()


@postgresOnly
def test_failuresOnEveryNodeCountTowardsOneBan(mailgate_server, mailgate_cli):
    a = node(mailgate_server, "a")
    b = node(mailgate_server, "b")
    mailgate_cli.addUser(ALICE, PASSWORD)
    failLogin(a, ATTACKER)
    failLogin(b, ATTACKER)
    failLogin(a, ATTACKER)
    for server in (a, b):
        waitFor(lambda: banned(server, ATTACKER), "both nodes to enforce the ban")
    assert banList(mailgate_cli)[ATTACKER][:2] == ["auth-failures", "3"]


def cramMD5Response(client, address, secret):
    """
    CRAM-MD5 (RFC 2195) as fetchmail sends it: the name and the HMAC-MD5
    of the server's challenge keyed with the password.
    """
    import base64
    import hmac

    challenge = client._shortcmd("AUTH CRAM-MD5")
    assert challenge.startswith(b"+ "), challenge
    digest = hmac.new(secret.encode(), base64.b64decode(challenge[2:]), "md5").hexdigest()
    return base64.b64encode(f"{address} {digest}".encode()).decode()


@sqliteOnly
def test_fetchmailsCramMD5BeforeUSERIsNotABannableFailure(mailgate_server, mailgate_cli):
    """
    fetchmail's default (C{auth any}) tries CRAM-MD5 whenever CAPA offers
    it (mailgate does with --apop, and by default while some user has
    CRAM-MD5 states imported from Dovecot, not because some user has
    APOP), then falls back to USER/PASS.  For a user without APOP that
    CRAM-MD5 cannot succeed, and
    it guessed nothing: polling such accounts must not ban the address
    (a fetchmail polling ten accounts used to be banned at the tenth).
    A wrong digest still counts once its session ends without that
    user's own login, whoever it names.
    """
    server = mailgate_server(*STRICT, "--apop")
    mailgate_cli.addUser(ALICE, PASSWORD)
    mailgate_cli.addUser("apop@example.org", PASSWORD, apop=True)
    for _ in range(4):
        client = BoundPOP3(server.port, USER)
        assert "CRAM-MD5" in client.capa()["SASL"]
        with pytest.raises(poplib.error_proto) as refused:
            client._shortcmd(cramMD5Response(client, ALICE, PASSWORD))
        assert refused.value.args[0] == b"-ERR [AUTH] invalid user name or password"
        client.user(ALICE)
        assert client.pass_(PASSWORD).startswith(b"+OK")
        client.quit()
    assert admitted(server, USER)

    for name in ("apop@example.org", ALICE, "nobody@example.org"):
        client = BoundPOP3(server.port, ATTACKER)
        with pytest.raises(poplib.error_proto):
            client._shortcmd(cramMD5Response(client, name, WRONG))
        client.close()
    # Counted as each session ends.
    waitFor(lambda: banned(server, ATTACKER), "the address banned")
