"""
Traces of chosen clients' sessions (C{--debug-peer}, C{--debug-user}):
what they show, and what they never show (passwords, SASL exchanges,
message content).  In memory, then once through a running server.
"""

import base64
import hashlib
import hmac

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import formatEvent

from e2e import BoundPOP3, mailgate_cli, mailgate_server, sqliteOnly  # noqa: F401 (fixtures)
from mailgate.session import TraceSelection
from mailgate.session.trace import LINE_LIMIT, replyLine
from mailgate.testing import POP3Session, SMTPSession, addUser, deliver, memoryStore, pop3Factory, resultOf, smtpFactory

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "wonderland"
BODY = b"Subject: private\r\n\r\nthe secret body line\r\n"
CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)
OTHER = IPv4Address("TCP", "192.0.2.8", 40000)


@pytest.fixture
def alice(store):
    addUser(store, ALICE, PASSWORD, apop=True)
    addUser(store, BOB, "builder")
    deliver(store, [ALICE], BODY)
    return ALICE


def traced(events):
    """
    The trace of a session, as C{"C: ..."} and C{"S: ..."} lines (and the
    line saying why it started).
    """
    return [
        e["trace"] if e["direction"] == "-" else f"{e['direction']}: {e['trace']}"
        for e in events
        if e.get("event") == "session.trace"
    ]


def pop3(store, peer=CLIENT, networks=(), users=()):
    clock = Clock()
    factory = pop3Factory(store, clock, hostname="mailgate.test", trustedNetworks=["192.0.2.0/24"])
    factory.trace = TraceSelection(networks, users)
    return POP3Session(store, clock=clock, factory=factory, peer=peer)


def neverShown(events, *secrets):
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    for secret in secrets:
        assert secret not in text


def test_aClientOnADebugNetworkIsTracedFromItsGreeting(store, alice, logEvents):
    s = pop3(store, networks=["192.0.2.0/29"])
    s.command("CAPA")
    s.command(f"USER {ALICE}")
    s.command(f"PASS {PASSWORD}")
    s.command("STAT")
    s.command("LIST")
    s.command("RETR 1")
    s.command("TOP 1 0")
    s.command("QUIT")
    lines = traced(logEvents)
    assert lines[0] == "started: the client is on --debug-peer"
    assert lines[1].startswith("S: +OK ") and s.challenge in lines[1]
    assert lines[2:] == [
        "C: CAPA",
        "S: +OK capability list follows ...",
        f"C: USER {ALICE}",
        "S: +OK send PASS",
        "C: PASS <password>",
        lines[7],
        "C: STAT",
        f"S: +OK 1 {len(BODY)}",
        "C: LIST",
        "S: +OK 1 messages (%d octets) ..." % len(BODY),
        "C: RETR 1",
        "S: +OK %d octets ..." % len(BODY),
        "C: TOP 1 0",
        "S: +OK top of message follows ...",
        "C: QUIT",
        lines[-1],
    ]
    assert lines[7] == f"S: +OK {ALICE} has 1 messages ({len(BODY)} octets)"
    assert lines[-1].startswith("S: +OK mailgate POP3 server signing off")
    neverShown(logEvents, PASSWORD, "secret body", "private")
    # Each line names the session and the client, as every session line.
    event = [e for e in logEvents if e.get("event") == "session.trace"][4]
    assert event["session"] == s.protocol.sessionId
    assert formatEvent(event) == f"pop3 trace peer=192.0.2.7:40000 C: USER {ALICE}"


def test_otherClientsAreNotTraced(store, alice, logEvents):
    s = pop3(store, peer=OTHER, networks=["192.0.2.7/32"], users=[BOB])
    assert s.login(ALICE, PASSWORD).startswith("+OK")
    s.command("RETR 1")
    assert traced(logEvents) == []


def test_secretsAreHiddenInEveryFormTheyCome(store, alice, logEvents):
    """
    PASS's argument, APOP's digest, AUTH's initial response, the client's
    SASL responses and the server's challenges: hidden, including in
    commands that will be refused (a tab instead of a space).
    """
    s = pop3(store, networks=["192.0.2.7/32"])
    plain = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    assert s.command("PASS\twonderland").startswith("-ERR")
    assert s.command("pass   wonderland").startswith("-ERR")
    assert s.command(f"AUTH PLAIN {plain}").startswith("+OK")
    s.command("QUIT")
    s = pop3(store, networks=["192.0.2.7/32"])
    assert s.command("AUTH PLAIN") == "+ \r\n"
    assert s.command(plain).startswith("+OK")
    s.command("QUIT")
    s = pop3(store, networks=["192.0.2.7/32"])
    digest = hashlib.md5(f"{s.challenge}{PASSWORD}".encode()).hexdigest()
    assert s.command(f"APOP {ALICE} {digest}").startswith("+OK")
    lines = [line for line in traced(logEvents) if line.startswith("C: ") or line.startswith("S: + ")]
    assert lines == [
        "C: PASS <password>",
        "C: PASS <password>",
        "C: AUTH PLAIN <initial response>",
        "C: QUIT",
        "C: AUTH PLAIN",
        "S: + <SASL challenge>",
        "C: <SASL response>",
        "C: QUIT",
        f"C: APOP {ALICE} <digest>",
    ]
    neverShown(logEvents, PASSWORD, digest, plain)


def test_aPasswordSentWhereACommandGoesAfterUSERIsHidden(store, alice, logEvents):
    """
    A client (or a person at a terminal) that sends the password after
    USER without PASS, on a line of its own or on USER's own line: until
    a command comes, a line after USER that is none is hidden, and so is
    what follows USER's first word.
    """
    s = pop3(store, networks=["192.0.2.7/32"])
    assert s.command(f"USER {ALICE}").startswith("+OK")
    assert s.command(PASSWORD).startswith("-ERR")
    assert s.command(f"USER {ALICE} {PASSWORD}").startswith("+OK")
    assert s.command("NOOP").startswith("-ERR")
    assert s.command("LAST").startswith("-ERR")
    lines = [line for line in traced(logEvents) if line.startswith("C: ")]
    assert lines == [
        f"C: USER {ALICE}",
        "C: <not a command: hidden after USER>",
        f"C: USER {ALICE} <more hidden>",
        "C: NOOP",
        "C: LAST",
    ]
    neverShown(logEvents, PASSWORD)


def test_SASLResponsesThatComeAsCommandsAreHidden(store, alice, logEvents):
    """
    A client that sends its SASL responses whatever the reply to its AUTH
    (pipelined, or going on after a refusal: plaintext refused on this
    connection, a mechanism the server does not offer) has them read as
    commands: the trace hides them, not knowing them from a password in
    base64, until the client sends a command again.
    """
    outside = IPv4Address("TCP", "198.51.100.7", 40000)
    plain = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    token = base64.b64encode(f"user={ALICE}\x01auth=Bearer tok-{PASSWORD}\x01\x01".encode()).decode()
    login = base64.b64encode(PASSWORD.encode()).decode()
    s = pop3(store, peer=outside, networks=["198.51.100.0/24"])
    assert s.command("AUTH PLAIN").startswith("-ERR [AUTH] Plaintext authentication disallowed")
    assert s.command(plain) == "-ERR unknown command\r\n"
    assert s.command("AUTH XOAUTH2").startswith("-ERR unsupported authentication mechanism")
    assert s.command(token) == "-ERR unknown command\r\n"
    assert s.command("AUTH LOGIN").startswith("-ERR [AUTH] Plaintext")
    s.command(base64.b64encode(ALICE.encode()).decode())
    s.command(login)
    assert s.command("capa").startswith("+OK")
    s.command("XYZZY")
    lines = [line for line in traced(logEvents) if line.startswith("C: ")]
    assert lines == [
        "C: AUTH PLAIN",
        "C: <not a command: hidden after AUTH>",
        "C: AUTH XOAUTH2",
        "C: <not a command: hidden after AUTH>",
        "C: AUTH LOGIN",
        "C: <not a command: hidden after AUTH>",
        "C: <not a command: hidden after AUTH>",
        "C: capa",
        "C: XYZZY",
    ]
    neverShown(logEvents, PASSWORD, plain, token, login)


def test_anSMTPClientTryingAUTHHasItsPasswordHidden(store, alice, logEvents):
    """
    mailgate's SMTP offers no AUTH, but clients set up for a submission
    server (and password guessers) send it all the same: its initial
    response, and the lines after it that are no command, are hidden.
    """
    clock = Clock()
    factory = smtpFactory(store, clock, hostname="mailgate.test")
    factory.trace = TraceSelection(["192.0.2.7/32"])
    s = SMTPSession(store, clock=clock, factory=factory, peer=CLIENT)
    plain = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    login = base64.b64encode(PASSWORD.encode()).decode()
    s.command("EHLO client.test")
    assert s.command(f"AUTH PLAIN {plain}").startswith("5")
    assert s.command("AUTH LOGIN").startswith("5")
    assert s.command(base64.b64encode(ALICE.encode()).decode()).startswith("500")
    assert s.command(login).startswith("500")
    s.command("NOOP")
    lines = [line for line in traced(logEvents) if line.startswith("C: ")]
    assert lines == [
        "C: EHLO client.test",
        "C: AUTH PLAIN <initial response>",
        "C: AUTH LOGIN",
        "C: <not a command: hidden after AUTH>",
        "C: <not a command: hidden after AUTH>",
        "C: NOOP",
    ]
    neverShown(logEvents, PASSWORD, plain, login)


def test_aPOP3ClientTalkingToSMTPHasItsPasswordHidden(store, alice, logEvents):
    """
    A POP3 client set up with the SMTP port (the very client a trace is
    turned on for) sends USER and PASS there: each is refused, and the
    trace shows PASS without its password, as POP3's own trace does.
    """
    clock = Clock()
    factory = smtpFactory(store, clock, hostname="mailgate.test")
    factory.trace = TraceSelection(["192.0.2.7/32"])
    s = SMTPSession(store, clock=clock, factory=factory, peer=CLIENT)
    assert s.command(f"USER {ALICE}").startswith("500")
    assert s.command(f"PASS {PASSWORD}").startswith("500")
    assert s.command(f" pass\t{PASSWORD}").startswith("500")
    lines = [line for line in traced(logEvents) if line.startswith("C: ")]
    assert lines == [f"C: USER {ALICE}", "C: PASS <password>", "C: PASS <password>"]
    neverShown(logEvents, PASSWORD)


@pytest.mark.parametrize("kind", ["pop3", "smtp"])
def test_anIMAPClientTalkingToTheWrongPortHasItsPasswordHidden(store, alice, logEvents, kind):
    """
    An IMAP client set up with the POP3 or SMTP port sends its tagged
    LOGIN (user name and password) or AUTHENTICATE (and its SASL
    responses): the trace shows the tag and the command, not what follows.
    """
    if kind == "pop3":
        s = pop3(store, networks=["192.0.2.7/32"])
    else:
        factory = smtpFactory(store, Clock(), hostname="mailgate.test")
        factory.trace = TraceSelection(["192.0.2.7/32"])
        s = SMTPSession(store, clock=Clock(), factory=factory, peer=CLIENT)
    plain = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    s.command("a1 CAPABILITY")
    s.command(f'a2 LOGIN {ALICE} "{PASSWORD}"')
    s.command("a3 AUTHENTICATE PLAIN")
    s.command(plain)
    s.command("NOOP")
    lines = [line for line in traced(logEvents) if line.startswith("C: ")]
    assert lines == [
        "C: a1 CAPABILITY",
        "C: a2 LOGIN <arguments>",
        "C: a3 AUTHENTICATE <arguments>",
        "C: <not a command: hidden after IMAP's AUTHENTICATE>",
        "C: NOOP",
    ], lines
    neverShown(logEvents, PASSWORD, plain)


def test_aCRAMResponseIsHidden(store, alice, logEvents):
    s = pop3(store, networks=["192.0.2.7/32"])
    reply = s.command("AUTH CRAM-MD5")
    challenge = base64.b64decode(reply[2:].strip())
    digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
    response = base64.b64encode(f"{ALICE} {digest}".encode()).decode()
    assert s.command(response).startswith("+OK")
    assert traced(logEvents)[-3:-1] == ["S: + <SASL challenge>", "C: <SASL response>"]
    neverShown(logEvents, response, digest, challenge.decode())


def test_aDebugUserIsTracedOnceNamed(store, alice, logEvents):
    s = pop3(store, users=["Alice@Example.org"])
    s.command("CAPA")
    s.command(f"USER {BOB}")
    assert traced(logEvents) == []
    s.command("USER alice@EXAMPLE.org")
    s.command(f"PASS {PASSWORD}")
    s.command("STAT")
    assert traced(logEvents) == [
        "started: USER alice@EXAMPLE.org, on --debug-user",
        "S: +OK send PASS",
        "C: PASS <password>",
        traced(logEvents)[3],
        "C: STAT",
        f"S: +OK 1 {len(BODY)}",
    ]
    # Bob, logging in, is not traced.
    del logEvents[:]
    other = pop3(store, users=[ALICE])
    assert other.login(BOB, "builder").startswith("+OK")
    assert traced(logEvents) == []


def test_aMasterUsersLoginToADebugUserIsTracedFromItsUSER(store, alice, logEvents):
    """
    With --master-user-separator, USER alice@example.org*admin names
    alice's maildrop: traced from that USER, as alice's own USER is, so
    that a helpdesk's login that fails shows too.  It was traced only
    once logged in: a failing one not at all.  Another user's is not.
    """
    s = pop3(store, users=[ALICE])
    s.factory.masterUserSeparator = "*"
    s.command(f"USER {BOB}*admin")
    assert traced(logEvents) == []
    assert s.command(f"USER {ALICE}*admin") == "+OK send PASS\r\n"
    assert s.command("PASS not-the-masters-password").startswith("-ERR [AUTH] ")
    lines = traced(logEvents)
    assert lines[:3] == [
        f"started: USER {ALICE}*admin, on --debug-user",
        "S: +OK send PASS",
        "C: PASS <password>",
    ]
    assert lines[3].startswith("S: -ERR [AUTH] ")
    neverShown(logEvents, "not-the-masters-password")


def test_aDebugUsersSASLLoginIsTracedFromTheExchangeThatNamesIt(store, alice, logEvents):
    """
    A client that logs in by SASL (AUTH PLAIN, as Thunderbird does where it
    is offered) names the user in the exchange: its session is traced from
    the answer to it, as from USER, so that a login that fails shows too.
    It was traced only once logged in: a failing one not at all.  Neither
    the response nor the password is shown; another user is not traced.
    """
    s = pop3(store, users=[ALICE])
    wrong = base64.b64encode(f"\0{BOB}\0not-bobs".encode()).decode()
    assert s.command(f"AUTH PLAIN {wrong}").startswith("-ERR [AUTH] ")
    assert traced(logEvents) == []
    wrong = base64.b64encode(f"\0{ALICE}\0not-alices-password".encode()).decode()
    assert s.command(f"AUTH PLAIN {wrong}").startswith("-ERR [AUTH] ")
    s.command("CAPA")
    lines = traced(logEvents)
    assert lines[0] == f"started: AUTH PLAIN as {ALICE}, on --debug-user"
    assert lines[1].startswith("S: -ERR [AUTH] ")
    assert lines[2:4] == ["C: CAPA", "S: +OK capability list follows ..."]
    neverShown(logEvents, "not-alices-password", wrong)


def test_aDebugUserLoggingInWithoutUSERIsTracedFromItsLogin(store, alice, logEvents):
    s = pop3(store, users=[ALICE])
    digest = hashlib.md5(f"{s.challenge}{PASSWORD}".encode()).hexdigest()
    assert s.command(f"APOP {ALICE} {digest}").startswith("+OK")
    s.command("STAT")
    lines = traced(logEvents)
    assert lines[0] == f"started: logged in as {ALICE}, on --debug-user"
    assert lines[1].startswith("S: +OK ")
    assert lines[2:] == ["C: STAT", f"S: +OK 1 {len(BODY)}"]


def test_anSMTPClientOnADebugNetworkIsTracedWithoutItsMessage(store, alice, logEvents):
    clock = Clock()
    factory = smtpFactory(store, clock, hostname="mailgate.test")
    factory.trace = TraceSelection(["192.0.2.7/32"])
    s = SMTPSession(store, clock=clock, factory=factory, peer=CLIENT)
    s.command("EHLO client.test")
    s.command("MAIL FROM:<sender@remote.test>")
    s.command(f"RCPT TO:<{ALICE}>")
    s.command("DATA")
    assert s.send(BODY + b".\r\n").startswith(b"250 ")
    s.command("QUIT")
    lines = traced(logEvents)
    assert lines[:3] == [
        "started: the client is on --debug-peer",
        lines[1],
        "C: EHLO client.test",
    ]
    assert lines[1].startswith("S: 220 mailgate.test")
    assert lines[3] == "S: 250-mailgate.test greets client.test ..."
    assert lines[4:9] == [
        "C: MAIL FROM:<sender@remote.test>",
        lines[5],
        f"C: RCPT TO:<{ALICE}>",
        lines[7],
        "C: DATA",
    ]
    assert lines[9].startswith("S: 354 ")
    assert lines[10].startswith("S: 250 2.0.0 OK: message accepted")
    assert lines[11:] == ["C: QUIT", lines[12]] and lines[12].startswith("S: 221 ")
    neverShown(logEvents, "secret body", "private")


@pytest.mark.parametrize("recipient", [None, "nobody@example.org"])
def test_aMessageSentAfterARefusedDATAIsNotTraced(store, alice, logEvents, recipient):
    """
    A client that sends its message whatever the reply to DATA (503 for
    no MAIL, 554 for no valid recipient) has the message's lines run as
    commands, each refused: the trace hides those that are no command,
    as it hides a SASL response after AUTH, until a command comes.
    """
    clock = Clock()
    factory = smtpFactory(store, clock, hostname="mailgate.test")
    factory.trace = TraceSelection(["192.0.2.7/32"])
    s = SMTPSession(store, clock=clock, factory=factory, peer=CLIENT)
    s.command("EHLO client.test")
    if recipient is not None:
        s.command("MAIL FROM:<sender@remote.test>")
        assert s.command(f"RCPT TO:<{recipient}>").startswith("550")
    assert s.command("DATA")[:3] in ("503", "554")
    # (Its final "." would end the session: a line that begins with no
    # letter is no SMTP command, see test_smtp_protocol.)
    for line in BODY.decode().split("\r\n")[:-1]:
        assert s.command(line).startswith("500")
    s.command("NOOP")
    lines = [line for line in traced(logEvents) if line.startswith("C: ")]
    hidden = "C: <not a command: hidden after a refused DATA>"
    assert lines[-5:] == ["C: DATA", hidden, hidden, hidden, "C: NOOP"], lines
    neverShown(logEvents, "secret body", "private")


def test_anLMTPSessionIsTracedFromARecipientOnDebugUser(store, alice, logEvents):
    """
    --debug-user traces what becomes of the user's mail too: an SMTP or
    LMTP session from the RCPT naming the user (or a detail of it) on;
    the message's content stays out, and sessions for others are not
    traced.
    """
    clock = Clock()
    factory = smtpFactory(store, clock, lmtp=True, hostname="mailgate.test")
    factory.delivery.recipientDelimiter = "+"
    factory.trace = TraceSelection(users=[ALICE])
    other = SMTPSession(store, lmtp=True, clock=clock, factory=factory, peer=CLIENT)
    other.command("LHLO mta.test")
    other.command("MAIL FROM:<sender@remote.test>")
    other.command(f"RCPT TO:<{BOB}>")
    assert traced(logEvents) == []
    s = SMTPSession(store, lmtp=True, clock=clock, factory=factory, peer=CLIENT)
    s.command("LHLO mta.test")
    s.command("MAIL FROM:<sender@remote.test>")
    detail = ALICE.replace("@", "+lists@")
    assert s.command(f"RCPT TO:<{detail}>").startswith("250")
    s.command("DATA")
    assert s.send(BODY + b".\r\n").startswith(b"250 ")
    lines = traced(logEvents)
    assert lines[0] == f"started: RCPT TO:<{detail}>, on --debug-user"
    assert lines[1].startswith("S: 250 2.1.5 ")
    assert lines[2:4] == ["C: DATA", lines[3]] and lines[3].startswith("S: 354 ")
    assert lines[4].startswith(f"S: 250 2.0.0 <{detail}> delivered as ")
    neverShown(logEvents, "secret body", "private")


def test_anSMTPSessionIsTracedFromARecipientThatIsAnAliasOfTheUser(store, alice, logEvents):
    """
    Mail to an alias of a user of --debug-user is the user's: the session
    is traced from that RCPT's reply on (the alias is known only once
    looked up), naming both.  It was not traced at all: the trace
    compared the address the client gave with the user's alone.  An
    alias of another user is not traced.
    """
    resultOf(store.addAlias("info@example.org", ALICE))
    resultOf(store.addAlias("sales@example.org", BOB))
    clock = Clock()
    factory = smtpFactory(store, clock, hostname="mailgate.test")
    factory.trace = TraceSelection(users=[ALICE])
    other = SMTPSession(store, clock=clock, factory=factory, peer=CLIENT)
    other.command("EHLO mta.test")
    other.command("MAIL FROM:<sender@remote.test>")
    assert other.command("RCPT TO:<sales@example.org>").startswith("250")
    assert traced(logEvents) == []
    s = SMTPSession(store, clock=clock, factory=factory, peer=CLIENT)
    s.command("EHLO mta.test")
    s.command("MAIL FROM:<sender@remote.test>")
    assert s.command("RCPT TO:<info@example.org>").startswith("250")
    s.command("DATA")
    assert s.send(BODY + b".\r\n").startswith(b"250 ")
    lines = traced(logEvents)
    assert lines[:4] == [
        f"started: RCPT TO:<info@example.org>, an alias of {ALICE}, on --debug-user",
        "S: 250 2.1.5 recipient <info@example.org> OK",
        "C: DATA",
        "S: 354 End data with <CR><LF>.<CR><LF>",
    ]
    assert lines[4].startswith("S: 250 2.0.0 ")
    neverShown(logEvents, "secret body", "private")


def test_aClientBehindAProxyOrAnMTAIsTracedFromTheCommandThatNamesIt(store, alice, logEvents):
    """
    --debug-peer names the client's network; behind Dovecot's POP3 proxy
    (XCLIENT) or an MTA that says whom it relays (XFORWARD), from an
    address on --xclient-network, the client is known from that command
    on, and the session is traced from it.  POP3's XCLIENT and XFORWARD
    were not traced at all (SMTP's XCLIENT was).  Another client is not.
    """
    proxy = IPv4Address("TCP", "127.0.0.1", 5000)
    clock = Clock()
    factory = pop3Factory(store, clock, hostname="mailgate.test", apop=False, xclientNetworks=["127.0.0.1/32"])
    factory.trace = TraceSelection(["192.0.2.7/32"])
    other = POP3Session(store, clock=clock, factory=factory, peer=proxy)
    assert other.command("XCLIENT ADDR=198.51.100.1 PORT=1").startswith("+OK")
    assert traced(logEvents) == []
    s = POP3Session(store, clock=clock, factory=factory, peer=proxy)
    assert s.command("XCLIENT ADDR=192.0.2.7 PORT=4711").startswith("+OK")
    s.command(f"USER {ALICE}")
    assert traced(logEvents) == [
        "started: the client XCLIENT named is on --debug-peer",
        "S: +OK the client's address is taken",
        f"C: USER {ALICE}",
        "S: +OK send PASS",
    ]

    del logEvents[:]
    smtp = smtpFactory(store, clock, lmtp=True, hostname="mailgate.test", xclientNetworks=["127.0.0.1/32"])
    smtp.trace = TraceSelection(["192.0.2.7/32"])
    mta = SMTPSession(store, lmtp=True, clock=clock, factory=smtp, peer=proxy)
    mta.command("LHLO mta.test")
    assert mta.command("XFORWARD ADDR=198.51.100.1") == "250 2.0.0 OK\r\n"
    assert traced(logEvents) == []
    assert mta.command("XFORWARD ADDR=192.0.2.7 HELO=client.example.net") == "250 2.0.0 OK\r\n"
    mta.command("MAIL FROM:<sender@remote.test>")
    assert traced(logEvents) == [
        "started: the client XFORWARD named is on --debug-peer",
        "S: 250 2.0.0 OK",
        "C: MAIL FROM:<sender@remote.test>",
        "S: 250 2.1.0 sender <sender@remote.test> OK",
    ]


def test_aTraceLineIsCutAndShowsNothingUnprintable():
    assert replyLine(b"+OK \x1b[31mred\r\nmore\r\n") == "+OK ?[31mred ..."
    assert replyLine(b".\r\n") is None
    assert replyLine(b"+ PDEyMzQ+\r\n") == "+ <SASL challenge>"
    long = replyLine(b"-ERR " + b"x" * 1000 + b"\r\n")
    assert len(long) == LINE_LIMIT + 3 and long.endswith("...")


def test_aServerThatTracesSaysSoAtEveryStart(tmp_path):
    """
    Tracing left on fills the log: every start says who is traced.
    """
    from twisted.internet.testing import MemoryReactorClock

    from mailgate.service import MailgateConfig, makeService

    config = MailgateConfig(
        database=f"sqlite:///{tmp_path / 'mail.sqlite3'}", pop3=["tcp:1110"],
        debugPeers=["192.0.2.7/32"], debugUsers=[ALICE],
    )
    root = makeService(config, reactor=MemoryReactorClock(), store=memoryStore())
    assert [text for event, text in root.startupWarnings if event == "trace.enabled"] == [
        f"tracing the sessions of clients on 192.0.2.7/32, user {ALICE} (--debug-peer, --debug-user): "
        "their commands and replies go to the log; take the options away when done"
    ]
    quiet = makeService(
        MailgateConfig(database=config.database, pop3=["tcp:1110"]), reactor=MemoryReactorClock(), store=memoryStore()
    )
    assert [event for event, _ in quiet.startupWarnings if event == "trace.enabled"] == []


def test_traceSelection():
    selection = TraceSelection(["10.0.0.0/8", "::ffff:192.0.2.0/120"], ["Alice@example.org"])
    assert selection.peer(IPv4Address("TCP", "10.1.2.3", 1))
    assert selection.peer(IPv4Address("TCP", "192.0.2.9", 1))
    assert not selection.peer(IPv4Address("TCP", "127.0.0.1", 1))
    assert selection.user(" alice@EXAMPLE.org")
    assert not selection.user("bob@example.org")
    assert not TraceSelection()


# -- a running server -------------------------------------------------------------


@sqliteOnly
def test_debugPeerOnARunningServer(mailgate_server, mailgate_cli):
    mailgate_cli.addUser(ALICE, PASSWORD)
    mailgate_cli.deliver(ALICE, b"Subject: private\n\nthe secret body line\n")
    server = mailgate_server("--debug-peer", "127.0.0.2/32", "--log-format", "json")
    for source in ("127.0.0.2", "127.0.0.3"):
        client = BoundPOP3(server.port, source)
        client.user(ALICE)
        client.pass_(PASSWORD)
        assert b"the secret body line" in b"\n".join(client.retr(1)[1])
        client.quit()
    server.stop()
    log = server.stdout
    assert '"event":"session.trace"' in log
    assert '"peer":"127.0.0.2:' in log and '"trace":"PASS <password>"' in log
    assert '"trace":"RETR 1"' in log
    traces = [line for line in log.splitlines() if '"session.trace"' in line]
    assert not [line for line in traces if "127.0.0.3" in line]
    assert PASSWORD not in log and "secret body" not in log


@sqliteOnly
def test_tracingStartsOnAReloadWithoutARestart(mailgate_server, mailgate_cli, tmp_path):
    """
    C{systemctl reload} (SIGHUP) after the configuration file gains a
    debug-peer: the running server traces that client's next session; the
    sessions of others stay untraced, and nothing restarted.
    """
    import signal

    from e2e import waitFor

    mailgate_cli.addUser(ALICE, PASSWORD)
    path = tmp_path / "mailgate.toml"
    path.write_text("max-recipients = 100\n")
    server = mailgate_server("--config", str(path))
    client = BoundPOP3(server.port, "127.0.0.2")
    client.user(ALICE)
    client.pass_(PASSWORD)
    client.quit()
    assert "session.trace" not in server.stdout and "trace peer=" not in server.stdout
    path.write_text('max-recipients = 100\ndebug-peer = ["127.0.0.2/32"]\n')
    server.process.send_signal(signal.SIGHUP)
    waitFor(lambda: "configuration reloaded: applied debug-peer" in server.stdout, "the reload")
    for source in ("127.0.0.2", "127.0.0.3"):
        client = BoundPOP3(server.port, source)
        client.user(ALICE)
        client.pass_(PASSWORD)
        client.quit()
    waitFor(lambda: "trace peer=127.0.0.2:" in server.stdout and "S: +OK mailgate POP3 server signing off"
            in server.stdout, "the trace")
    assert "C: PASS <password>" in server.stdout
    assert "trace peer=127.0.0.3" not in server.stdout
    assert PASSWORD not in server.stdout
    assert server.running()


@pytest.mark.parametrize("name", ["alice@b\u00fccher.example", "Alice@xn--bcher-kva.example.", "alice+x@B\u00dcCHER.example"])
def test_aDebugUserIsTracedUnderEveryNameItsMailAndLoginsTake(store, logEvents, name):
    """
    --debug-user alice@xn--bcher-kva.example traces the session whose
    RCPT or USER names her as delivery and login read names (her domain in
    Unicode, a trailing dot): compared as sent, the RCPT that brought her
    mail was not traced.
    """
    user = "alice@xn--bcher-kva.example"
    addUser(store, user, PASSWORD)
    clock = Clock()
    factory = smtpFactory(store, clock, lmtp=True, hostname="mailgate.test")
    factory.delivery.recipientDelimiter = "+"
    factory.trace = TraceSelection(users=[user])
    s = SMTPSession(store, lmtp=True, clock=clock, factory=factory, peer=CLIENT)
    s.command("LHLO mta.test")
    s.command("MAIL FROM:<sender@remote.test> SMTPUTF8")
    assert s.command(f"RCPT TO:<{name}>").startswith("250")
    assert traced(logEvents)[:1] == [f"started: RCPT TO:<{name}>, on --debug-user"]
    del logEvents[:]
    s = pop3(store, users=[user])
    s.command(f"USER {name.replace('+x', '')}")
    assert traced(logEvents)[:1] == [f"started: USER {name.replace('+x', '')}, on --debug-user"]
