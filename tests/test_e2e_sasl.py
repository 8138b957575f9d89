"""
SASL LOGIN and CRAM-MD5 against a real C{twistd mailgate}: raw exchanges
over a socket (poplib has no AUTH), and curl choosing each mechanism with
C{--login-options}.

Alice has no APOP secret, Bob has one: CRAM-MD5, like APOP, works for Bob
only; LOGIN, like USER/PASS, for both.  By default Bob's APOP puts a
timestamp in the greeting but does not make CRAM-MD5 offered (clients that
pick it whenever it is listed would fail for Alice); C{--apop} offers it.
"""

import base64
import poplib
import shutil

import pytest

from e2e import (  # noqa: F401 (mailgate_server is a fixture)
    DEADLINE,
    LineReader,
    connect,
    mailgate_cli,
    mailgate_server,
    runCommand,
    sqliteOnly,
)
from saslclients import cramMD5Response

ALICE = "alice@example.org"
BOB = "bob@example.org"
ALICE_PW = "wonder land"
BOB_PW = "builder"
FAST_FAILURES = ("--auth-failure-delay", "0.05")
INVALID = b"-ERR [AUTH] invalid user name or password\r\n"


CURL = shutil.which("curl")


def b64(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data)


class Wire:
    """
    A raw POP3 connection to the server.
    """

    def __init__(self, port):
        self.sock = connect(port)
        self.reader = LineReader(self.sock)
        assert self.reader.line().startswith(b"+OK ")

    def command(self, line):
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.sock.sendall(line + b"\r\n")
        return self.reader.line()

    def challenge(self, reply):
        assert reply.startswith(b"+ ") and reply.endswith(b"\r\n"), reply
        return base64.b64decode(reply[2:-2], validate=True)

    def close(self):
        self.command("QUIT")
        self.sock.close()


def addUsers(mailgate_cli):
    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.addUser(BOB, BOB_PW, apop=True)
    for address in (ALICE, BOB):
        mailgate_cli.deliver(address, b"From: sender@example.net\nSubject: hi\n\nfor " + address.encode() + b"\n")


def greetingAndMechanisms(port):
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        return client.getwelcome(), client.capa()["SASL"]
    finally:
        client.quit()


@pytest.fixture
def server(mailgate_server, mailgate_cli):
    """
    A server offering CRAM-MD5 (C{--apop}), from the start.
    """
    addUsers(mailgate_cli)
    started = mailgate_server(*FAST_FAILURES, "--apop")
    greeting, offered = greetingAndMechanisms(started.port)
    assert b"<" in greeting and offered == ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN"], (greeting, offered)
    return started


@sqliteOnly
def test_byDefaultAUserWithAPOPGetsTheTimestampButNoCramMD5(mailgate_server, mailgate_cli):
    """
    With the default policy, Bob's APOP puts a timestamp in the greeting
    (the first greeting waits for the store's answer) and he logs in with
    APOP; SASL lists no CRAM-MD5 and refuses it as unsupported, so a
    client that would pick it logs Alice in with PLAIN or LOGIN.
    """
    addUsers(mailgate_cli)
    started = mailgate_server(*FAST_FAILURES)
    greeting, offered = greetingAndMechanisms(started.port)
    assert b"<" in greeting and offered == ["SCRAM-SHA-256", "PLAIN", "LOGIN"], (greeting, offered)
    wire = Wire(started.port)
    assert wire.command("AUTH CRAM-MD5").startswith(b"-ERR unsupported authentication mechanism")
    assert wire.command(b"AUTH PLAIN " + b64(f"\0{ALICE}\0{ALICE_PW}")).startswith(f"+OK {ALICE}".encode())
    wire.close()
    client = poplib.POP3("127.0.0.1", started.port, timeout=20)
    try:
        assert client.apop(BOB, BOB_PW).startswith(f"+OK {BOB}".encode())
    finally:
        client.quit()


@sqliteOnly
def test_loginAndCramMD5OnTheWire(server):

    # LOGIN, the name asked for and as an initial response.
    wire = Wire(server.port)
    assert wire.challenge(wire.command("AUTH LOGIN")) == b"Username:"
    assert wire.challenge(wire.command(b64(ALICE))) == b"Password:"
    assert wire.command(b64(ALICE_PW)).startswith(f"+OK {ALICE} has 1 messages".encode())
    assert wire.command("STAT").startswith(b"+OK 1 ")
    wire.close()
    wire = Wire(server.port)
    assert wire.challenge(wire.command(b"AUTH LOGIN " + b64(BOB))) == b"Password:"
    assert wire.command(b64(BOB_PW)).startswith(f"+OK {BOB} has 1 messages".encode())
    wire.close()

    # CRAM-MD5: Bob, with APOP, gets in; Alice, without, fails like a wrong password.
    wire = Wire(server.port)
    challenge = wire.challenge(wire.command("AUTH CRAM-MD5"))
    assert challenge.startswith(b"<") and challenge.endswith(b">"), challenge
    assert wire.command(b64(cramMD5Response(BOB, BOB_PW, challenge))).startswith(f"+OK {BOB}".encode())
    wire.close()
    wire = Wire(server.port)
    challenge = wire.challenge(wire.command("AUTH CRAM-MD5"))
    assert wire.command(b64(cramMD5Response(ALICE, ALICE_PW, challenge))) == INVALID
    challenge = wire.challenge(wire.command("AUTH CRAM-MD5"))
    assert wire.command(b64(cramMD5Response(BOB, "wrong", challenge))) == INVALID
    # LOGIN with a wrong password, the same answer.
    wire.command("AUTH LOGIN")
    wire.command(b64(ALICE))
    assert wire.command(b64("wrong")) == INVALID
    wire.sock.close()


@sqliteOnly
@pytest.mark.skipif(CURL is None, reason="curl is not installed (no curl on PATH)")
def test_curlLogsInWithLoginAndCramMD5(server):
    """
    curl fetches with the mechanism it is told to use (its -v trace shows
    the AUTH command it sent); CRAM-MD5 works for the user with APOP and
    fails, as a denied login, for the one without.
    """

    def curl(address, password, mechanism):
        return runCommand(
            [CURL, "-v", "-s", "-S", "--max-time", "15", "-u", f"{address}:{password}",
             "--login-options", f"AUTH={mechanism}", f"pop3://127.0.0.1:{server.port}/1"]
        )

    for address, password in ((ALICE, ALICE_PW), (BOB, BOB_PW)):
        code, out, err = curl(address, password, "LOGIN")
        assert code == 0, err
        assert "> AUTH LOGIN" in err and out.endswith(f"for {address}\r\n"), (out, err)
    code, out, err = curl(BOB, BOB_PW, "CRAM-MD5")
    assert code == 0, err
    assert "> AUTH CRAM-MD5" in err and out.endswith(f"for {BOB}\r\n"), (out, err)
    code, out, err = curl(ALICE, ALICE_PW, "CRAM-MD5")
    assert code == 67, (code, err)  # CURLE_LOGIN_DENIED
    code, out, err = curl(ALICE, "wrong", "LOGIN")
    assert code == 67, (code, err)


def test_aDefaultRealmLetsBareUserNamesLogIn(mailgate_server, mailgate_cli):
    """
    --auth-default-realm (Dovecot's auth_default_realm): a client set up
    with the bare user name of the server it moved from logs in by every
    mechanism; full addresses still work, and an unknown bare name fails
    like any wrong login.
    """
    from saslclients import ScramClient

    server = mailgate_server("--auth-default-realm", "Example.ORG", "--apop", "--auth-failure-delay", "0.1")
    mailgate_cli.addUser("alice@example.org", "wonder land", apop=True)
    for name in ("alice", "Alice", "alice@example.org"):
        pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
        pop.user(name)
        assert pop.pass_("wonder land").startswith(b"+OK"), name
        assert pop.stat() == (0, 0)
        pop.quit()
    pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    assert pop.apop("alice", "wonder land").startswith(b"+OK")
    pop.quit()
    wire = Wire(server.port)
    assert wire.command(b"AUTH PLAIN " + b64(b"\0alice\0wonder land")).startswith(b"+OK")
    wire.close()
    wire = Wire(server.port)
    client = ScramClient("alice", "wonder land")
    serverFirst = wire.challenge(wire.command(b"AUTH SCRAM-SHA-256 " + b64(client.first())))
    serverFinal = wire.challenge(wire.command(b64(client.final(serverFirst))))
    assert client.verify(serverFinal)
    assert wire.command(b"").startswith(b"+OK")
    wire.close()
    for name, password in (("bob", "wonder land"), ("alice", "wrong")):
        pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
        pop.user(name)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] invalid user name or password"):
            pop.pass_(password)
        pop.quit()
