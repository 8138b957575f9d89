"""
End-to-end tests of mail intake: a real C{twistd mailgate} process (as
installed, non-editable) taking mail over SMTP and LMTP from Python's
smtplib and from raw sockets, and serving it back over POP3 (poplib) from
the same process; the C{.tac} example of the README run by C{twistd -y}.

What is asserted is what a user sees: SMTP and LMTP replies on the wire,
the octets a POP3 client fetches (identical to what was sent, after the
C{Return-Path:} and C{Received:} fields the server prepends), what the
C{mailgate} command lists.  Every socket and process wait is bounded (see
L{e2e.DEADLINE}); nothing asserts on wall-clock time.

The tests whose server is only the other end of their clients' exchanges
share one (SMTP, LMTP and POP3) per backend (tests/sharedserver.py), each
with maildrops of its own; those about a kill, a restart, an option or a
start-up warning of their own start their own.
"""

import email.utils
import poplib
import re
import shutil
import signal
import smtplib
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from e2e import (  # noqa: F401 (mailgate_server is a fixture)
    DEADLINE,
    TWISTD,
    AdminCommand,
    LineReader,
    ServerProcess,
    _LOGGED_ERROR,
    connect,
    databaseURL,
    mailgate_cli,
    mailgate_server,
    runCommand,
    retrieve,
    sqliteOnly,
    waitFor,
)
from sharedserver import shared, sharedBackend, sharedServers  # noqa: F401 (fixtures)

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
NOBODY = "nobody@example.org"
ALICE_PW = "wonder land"
BOB_PW = "builder"
CAROL_PW = "c4rol"
PASSWORDS = {ALICE: ALICE_PW, BOB: BOB_PW, CAROL: CAROL_PW}
SENDER = "sender@example.net"
CLIENT = "client.test"  # what the clients say in EHLO/LHLO
SERVER = "mailgate.test"  # e2e.HOSTNAME, what the server calls itself

LOOPBACK_TCP = "tcp:0:interface=127.0.0.1"
SMTP_OPTIONS = ("--smtp", LOOPBACK_TCP, "--domain", "example.org")

REPO = Path(__file__).resolve().parent.parent


# -- clients ---------------------------------------------------------------


def smtpClient(server):
    client = smtplib.SMTP(timeout=DEADLINE, local_hostname=CLIENT)
    code, greeting = client.connect("127.0.0.1", server.portOf("SMTP"))
    assert code == 220, greeting
    client.greeting = greeting
    return client


def popLogin(server, address, password=None):
    client = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    client.user(address)
    client.pass_(password or PASSWORDS[address])
    return client


def fetchAll(server, address, password=None):
    """
    Every message of a maildrop, in POP3 order, leaving them in place.
    """
    client = popLogin(server, address, password)
    try:
        count, _ = client.stat()
        return [retrieve(client, n) for n in range(1, count + 1)]
    finally:
        client.quit()


def splitTrace(stored):
    """
    Cut the trace fields the server prepends off a stored message.

    @return: C{(Return-Path line, Received field with its continuation
        lines joined by CRLF, the rest)}; the rest is what the client sent.
    """
    end = stored.index(b"\r\n")
    returnPath, rest = stored[:end], stored[end + 2:]
    assert returnPath.startswith(b"Return-Path: "), stored[:300]
    # The copy's own Delivered-To: (--delivered-to final, the default):
    # see deliveredToOf.
    if rest.startswith(b"Delivered-To: "):
        rest = rest[rest.index(b"\r\n") + 2:]
    assert rest.startswith(b"Received: "), stored[:300]
    lines = []
    while True:
        end = rest.index(b"\r\n")
        lines.append(rest[:end])
        rest = rest[end + 2:]
        if not rest.startswith((b"\t", b" ")):
            break
    return returnPath, b"\r\n".join(lines), rest


def checkReceived(received, protocol, recipient=None, helo=CLIENT, byHost=SERVER, peer=r"\[127\.0\.0\.1\]"):
    """
    The Received field names the client, the server and the protocol
    (RFC 5321 section 4.4, RFC 3848), and ends with a valid date.
    """
    text = received.decode("utf-8")
    pattern = (
        rf"Received: from {re.escape(helo)} \({peer}\)\r\n"
        rf"\tby {re.escape(byHost)} \(mailgate\) with {protocol} id [0-9A-Za-z]+"
        rf"(?:\r\n\tfor <([^>]+)>)?; (.+)"
    )
    match = re.fullmatch(pattern, text, re.S)
    assert match, text
    forClause, date = match.groups()
    assert email.utils.parsedate_to_datetime(date) is not None, date
    # A "for" clause may name the one recipient of this copy, never another
    # one (that would disclose Bcc recipients to each other).
    if forClause is not None:
        assert recipient is not None and forClause == recipient, text
    return text


def deliveredToOf(stored):
    """
    The address of the copy's C{Delivered-To:} field, right after its
    C{Return-Path:} line (as Dovecot's LMTP puts it), or C{None}.
    """
    match = re.match(rb"Return-Path: [^\r\n]*\r\nDelivered-To: ([^\r\n]*)\r\n", stored)
    return None if match is None else match.group(1).decode("utf-8")


def assertDelivered(stored, sent, sender, protocol="ESMTP", recipient=None, **received):
    """
    A stored copy is the sent octets plus exactly the three trace fields:
    Return-Path:, the copy's Delivered-To: (naming the recipient, where
    the test says which), Received:.
    """
    returnPath, receivedField, rest = splitTrace(stored)
    assert returnPath == f"Return-Path: <{sender}>".encode()
    deliveredTo = deliveredToOf(stored)
    assert deliveredTo is not None, stored[:300]
    assert recipient is None or deliveredTo == recipient, stored[:300]
    checkReceived(receivedField, protocol, recipient, **received)
    assert len(rest) == len(sent)
    assert rest == sent


class Wire:
    """
    An SMTP or LMTP session on a raw socket.
    """

    def __init__(self, sock):
        self.sock = sock
        self.reader = LineReader(sock)

    def reply(self):
        """
        One reply, multi-line or not: C{(code, [texts])}.
        """
        texts = []
        while True:
            line = self.reader.line()
            assert re.match(rb"[2-5][0-9][0-9][ -]", line), line
            texts.append(line[4:-2].decode("utf-8"))
            if line[3:4] == b" ":
                return int(line[:3]), texts

    def command(self, text):
        self.sock.sendall(text.encode("utf-8") + b"\r\n")
        return self.reply()

    def send(self, data):
        self.sock.sendall(data)


def smtpWire(server, hello=True):
    wire = Wire(connect(server.portOf("SMTP")))
    code, _ = wire.reply()
    assert code == 220
    if hello:
        code, _ = wire.command(f"EHLO {CLIENT}")
        assert code == 250
    return wire


# -- messages ----------------------------------------------------------------


def headers(subject, to=ALICE):
    return (
        f"From: Sender <{SENDER}>\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: Mon, 02 Jan 2023 03:04:05 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.net>\r\n"
    ).encode()


PLAIN = headers("plain text") + b"\r\nHello Alice,\r\n\r\nthis is plain text.\r\n-- \r\nSender\r\n"

EIGHT_BIT = (
    headers("eight bit")
    + b"MIME-Version: 1.0\r\n"
    + b"Content-Type: text/plain; charset=utf-8\r\n"
    + b"Content-Transfer-Encoding: 8bit\r\n"
    + b"\r\n"
    + "Grüße aus Köln, ça va? Ελληνικά, 日本語\r\n".encode("utf-8")
    + bytes(range(0x80, 0x100))
    + b"\r\n"
    + b"\xff\xfe not UTF-8 either\r\n"
)

DOTS = (
    headers("dots")
    + b"\r\n"
    + b".starts with a dot\r\n"
    + b"..starts with two dots\r\n"
    + b".\r\n"
    + b"the line above is a lone dot\r\n"
    + b"...\r\n"
    + b" . space first\r\n"
    + b".\r\n"
)  # the last line is a lone dot too


def bigMessage(octets):
    """
    A message of exactly C{octets} octets of 100-octet lines, some of which
    start with a dot.
    """
    head = headers("five megabytes") + b"\r\n"
    lines = [head]
    size = len(head)
    n = 0
    while size + 100 <= octets:
        start = b"." if n % 7 == 0 else b""
        line = start + b"%08d " % n
        line += bytes(0x21 + (n + i) % 94 for i in range(98 - len(line))) + b"\r\n"
        lines.append(line)
        size += len(line)
        n += 1
    lines.append(b"e" * (octets - size - 2) + b"\r\n")
    data = b"".join(lines)
    assert len(data) == octets
    return data


def sizedMessage(octets, subject="sized"):
    """
    A message of exactly C{octets} octets (at least 200), in lines of 80
    to 159 octets.
    """
    head = headers(subject) + b"\r\n"
    left = octets - len(head)
    full = left // 80 - 1
    last = left - 80 * full
    data = head + (b"x" * 78 + b"\r\n") * full + b"y" * (last - 2) + b"\r\n"
    assert len(data) == octets, (len(data), octets)
    return data


# -- 1. smtplib in, poplib out -------------------------------------------------


def test_smtpIntoPop3ByteForByte(shared):
    """
    Mail sent with smtplib comes back over POP3 from the same process, byte
    for byte, behind a Return-Path and a Received field.
    """
    server = shared(*SMTP_OPTIONS, "--lmtp", LOOPBACK_TCP)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    bob = shared.address("bob")
    carol = shared.address("carol")
    passwords = {alice: ALICE_PW, bob: BOB_PW, carol: CAROL_PW}
    for address, password in passwords.items():
        mailgate_cli.addUser(address, password)
    big = bigMessage(5 * 1024 * 1024)

    client = smtpClient(server)
    assert client.sendmail(SENDER, [alice], PLAIN) == {}
    assert client.sendmail(SENDER, [alice], EIGHT_BIT, mail_options=["BODY=8BITMIME"]) == {}
    assert client.sendmail(SENDER, [alice], big) == {}
    assert client.sendmail(SENDER, [alice], DOTS) == {}
    many = headers("three recipients", to=f"{alice}, {bob}") + b"Cc: " + carol.encode() + b"\r\n\r\nto all three\r\n"
    assert client.sendmail(SENDER, [alice, bob, carol], many) == {}
    partly = headers("one unknown", to=f"{alice}, {NOBODY}, {bob}") + b"\r\nnobody will not get this\r\n"
    refused = client.sendmail(SENDER, [alice, NOBODY, bob], partly)
    assert set(refused) == {NOBODY}, refused
    code, text = refused[NOBODY]
    assert code == 550 and text.startswith(b"5.1.1 "), refused
    # The null reverse-path (a bounce) is accepted as well.
    bounce = headers("a bounce") + b"\r\nundeliverable\r\n"
    assert client.sendmail("<>", [carol], bounce) == {}
    assert client.quit()[0] == 221

    stored = fetchAll(server, alice, ALICE_PW)
    sent = [PLAIN, EIGHT_BIT, big, DOTS, many, partly]
    assert len(stored) == len(sent)
    for copy, original in zip(stored, sent):
        single = original not in (many, partly)
        assertDelivered(copy, original, SENDER, recipient=alice if single else None)

    bobs = fetchAll(server, bob, BOB_PW)
    assert len(bobs) == 2
    assertDelivered(bobs[0], many, SENDER)
    assertDelivered(bobs[1], partly, SENDER)
    carols = fetchAll(server, carol, CAROL_PW)
    assert len(carols) == 2
    assertDelivered(carols[0], many, SENDER)
    assertDelivered(carols[1], bounce, "", recipient=carol)

    # What the admin command reports agrees with what POP3 served.
    assert [row[1] for row in mailgate_cli.mailbox(alice)] == [len(m) for m in stored]
    assert NOBODY not in mailgate_cli.users()


def test_longLinesAreAcceptedAndServedByteForByte(shared, monkeypatch):
    """
    Lines past RFC 5321's 1000 octets, as bulk mailers' HTML, a long To:
    field or a forwarding fetchmail send them, are accepted by SMTP and
    LMTP (as Postfix and Dovecot accept them: refusing would bounce real
    mail) and served back by POP3 as they were sent: a 300 KB line, and a
    long line that begins with a dot, which SMTP and POP3 both stuff.
    """
    server = shared(*SMTP_OPTIONS, "--lmtp", LOOPBACK_TCP)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    # poplib, like many clients, refuses lines over 2048 octets; fetchmail
    # and Thunderbird do not.
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)
    mailgate_cli.addUser(alice, ALICE_PW)
    recipients = ", ".join(f"user{n}@example.org" for n in range(400))
    message = (
        headers("long lines", to=recipients)
        + b"\r\n<html>" + b"<p>wide</p>" * 30_000 + b"</html>\r\n"
        + b"." + b"d" * 5000 + b"\r\n"
        + b"end\r\n"
    )
    client = smtpClient(server)
    assert client.sendmail(SENDER, [alice], message) == {}
    client.quit()
    lmtp = smtplib.LMTP(timeout=DEADLINE, local_hostname=CLIENT)
    assert lmtp.connect("127.0.0.1", server.portOf("LMTP"))[0] == 220
    assert lmtp.sendmail(SENDER, [alice], message) == {}
    lmtp.quit()
    stored = fetchAll(server, alice, ALICE_PW)
    assert len(stored) == 2
    assertDelivered(stored[0], message, SENDER, recipient=alice)
    assertDelivered(stored[1], message, SENDER, protocol="LMTP", recipient=alice)


# -- 2. EHLO, SIZE, and refusals -----------------------------------------------

# Given as "100K" (units of 1024, as default-quota reads them).
LIMIT = 100 * 1024


def test_ehloSizeLimitAndRefusals(mailgate_server, mailgate_cli):
    """
    EHLO advertises SIZE (the configured limit), PIPELINING, 8BITMIME and
    ENHANCEDSTATUSCODES; a message over the limit is refused with 552 5.3.4
    whether its size was declared or not, and one of exactly the limit is
    taken; other domains get 550 5.7.1, unknown and deleted users 550 5.1.1.
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.addUser(BOB, BOB_PW)
    server = mailgate_server(*SMTP_OPTIONS, "--max-message-size", "100K")

    client = smtpClient(server)
    code, _ = client.ehlo()
    assert code == 250
    features = client.esmtp_features
    assert features.get("size") == str(LIMIT), features
    for name in ("pipelining", "8bitmime", "enhancedstatuscodes"):
        assert name in features, features

    # smtplib declares SIZE= because the server advertises SIZE.
    exact = sizedMessage(LIMIT, "exactly the limit")
    assert client.sendmail(SENDER, [ALICE], exact) == {}
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        client.sendmail(SENDER, [ALICE], sizedMessage(LIMIT + 1, "one octet over"))
    assert refused.value.smtp_code == 552
    assert refused.value.smtp_error.startswith(b"5.3.4 "), refused.value

    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        client.sendmail(SENDER, ["someone@elsewhere.example.net"], PLAIN)
    code, text = refused.value.recipients["someone@elsewhere.example.net"]
    assert code == 550 and text.startswith(b"5.7.1 "), refused.value.recipients
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        client.sendmail(SENDER, [NOBODY], PLAIN)
    code, text = refused.value.recipients[NOBODY]
    assert code == 550 and text.startswith(b"5.1.1 "), refused.value.recipients

    # A user deleted while the server runs is refused from then on.  The
    # server may still have them as a known recipient at RCPT; the commit
    # catches it then, and SMTP (all or nothing) answers 451 so that the
    # client tries again, when RCPT refuses them.  Either way the other
    # recipient gets exactly one copy.
    assert client.sendmail(SENDER, [BOB], PLAIN) == {}
    mailgate_cli.check("user", "del", BOB)
    afterDeletion = headers("after bob was deleted", to=f"{ALICE}, {BOB}") + b"\r\nonce\r\n"
    for attempt in range(2):
        try:
            refused = client.sendmail(SENDER, [ALICE, BOB], afterDeletion)
            break
        except smtplib.SMTPDataError as e:
            assert attempt == 0 and e.smtp_code == 451 and e.smtp_error.startswith(b"4.3.0 "), e
    assert set(refused) == {BOB}, refused
    code, text = refused[BOB]
    assert code == 550 and text.startswith(b"5.1.1 "), refused
    assert client.quit()[0] == 221

    # The same limit when the client does not declare a size: the server
    # counts what arrives and refuses at the end of DATA.
    wire = smtpWire(server)
    assert wire.command(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert wire.command(f"RCPT TO:<{ALICE}>")[0] == 250
    assert wire.command("DATA")[0] == 354
    wire.send(sizedMessage(LIMIT + 1, "undeclared and too big") + b".\r\n")
    code, texts = wire.reply()
    assert code == 552 and texts[0].startswith("5.3.4 "), (code, texts)
    # The session goes on; pipelined commands are answered in order.
    small = headers("after the refusal") + b"\r\nsmall\r\n"
    wire.send(
        f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nRCPT TO:<{NOBODY}>\r\n"
        f"RCPT TO:<x@elsewhere.example.net>\r\nDATA\r\n".encode()
    )
    assert wire.reply()[0] == 250
    assert wire.reply()[0] == 250
    code, texts = wire.reply()
    assert code == 550 and texts[0].startswith("5.1.1 "), texts
    code, texts = wire.reply()
    assert code == 550 and texts[0].startswith("5.7.1 "), texts
    assert wire.reply()[0] == 354
    wire.send(small + b".\r\n")
    code, texts = wire.reply()
    assert code == 250 and texts[0].startswith("2.0.0 "), texts
    assert wire.command("QUIT")[0] == 221
    assert wire.reader.closed()

    stored = fetchAll(server, ALICE)
    assert len(stored) == 3
    assertDelivered(stored[0], exact, SENDER, recipient=ALICE)
    assertDelivered(stored[1], afterDeletion, SENDER, recipient=ALICE)
    assertDelivered(stored[2], small, SENDER, recipient=ALICE)
    assert BOB not in mailgate_cli.users()


# -- 3. LMTP -------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_lmtpRepliesPerRecipient(mailgate_server, mailgate_cli, tmp_path, transport):
    """
    After DATA, LMTP answers once per accepted recipient, in RCPT order; a
    recipient removed between RCPT and DATA gets 550 and the others 250.
    """
    for address, password in PASSWORDS.items():
        mailgate_cli.addUser(address, password)
    if transport == "tcp":
        endpoint = LOOPBACK_TCP
    else:
        path = tmp_path / "lmtp.sock"
        assert len(str(path)) < 100, f"Unix socket path too long: {path}"
        endpoint = f"unix:{path}"
    server = mailgate_server("--lmtp", endpoint, "--domain", "example.org")
    where = server.portOf("LMTP")
    if transport == "tcp":
        client = smtplib.LMTP("127.0.0.1", where, local_hostname=CLIENT, timeout=DEADLINE)
        peer = r"\[127\.0\.0\.1\]"
    else:
        assert where == str(path)
        client = smtplib.LMTP(where, local_hostname=CLIENT, timeout=DEADLINE)
        peer = "local"

    code, _ = client.ehlo()  # smtplib.LMTP sends LHLO
    assert code == 250
    assert "pipelining" in client.esmtp_features and "enhancedstatuscodes" in client.esmtp_features

    def transaction(recipients, message, between=None):
        """
        MAIL, RCPT for each, (between), DATA; returns the RCPT replies and
        the replies after DATA.  smtplib.LMTP.data() reads only the first
        of these; the others are read with getreply().
        """
        assert client.mail(SENDER)[0] == 250
        rcpt = [client.rcpt(r) for r in recipients]
        accepted = [r for r, (code, _) in zip(recipients, rcpt) if code == 250]
        if between is not None:
            between()
        first = client.data(message)
        replies = [first] + [client.getreply() for _ in accepted[1:]]
        # Nothing more is pending: the next reply is the NOOP's own.
        assert client.noop() == (250, b"2.0.0 OK")
        return rcpt, accepted, replies

    first = headers("lmtp one", to=f"{ALICE}, {BOB}, {CAROL}") + b"\r\n.dot\r\nto three, one unknown\r\n"
    rcpt, accepted, replies = transaction([BOB, NOBODY, ALICE, CAROL], first)
    assert [code for code, _ in rcpt] == [250, 550, 250, 250]
    assert rcpt[1][1].startswith(b"5.1.1 ")
    assert accepted == [BOB, ALICE, CAROL]
    assert [code for code, _ in replies] == [250, 250, 250], replies
    for (code, text), address in zip(replies, accepted):
        assert text.startswith(b"2.0.0 <" + address.encode() + b">"), replies

    second = headers("lmtp two", to=f"{ALICE}, {BOB}, {CAROL}") + b"\r\nbob goes away\r\n"

    def deleteBob():
        mailgate_cli.check("user", "del", BOB)

    rcpt, accepted, replies = transaction([ALICE, BOB, CAROL], second, between=deleteBob)
    assert [code for code, _ in rcpt] == [250, 250, 250]
    assert [code for code, _ in replies] == [250, 550, 250], replies
    assert replies[0][1].startswith(b"2.0.0 <" + ALICE.encode() + b">")
    assert replies[1][1].startswith(b"5.1.1 <" + BOB.encode() + b">"), replies
    assert replies[2][1].startswith(b"2.0.0 <" + CAROL.encode() + b">")
    assert client.quit()[0] == 221

    assert BOB not in mailgate_cli.users()
    for address in (ALICE, CAROL):
        stored = fetchAll(server, address)
        assert len(stored) == 2
        assertDelivered(stored[0], first, SENDER, protocol="LMTP", peer=peer)
        assertDelivered(stored[1], second, SENDER, protocol="LMTP", peer=peer)


# -- 4. a server killed mid-DATA -------------------------------------------------


def test_killedMidDataLeavesNothingAndRetryDeliversOnce(mailgate_server, mailgate_cli):
    """
    SIGKILL while a client is in the middle of DATA: the acknowledged
    message before it survives, the unacknowledged one leaves nothing
    behind, and the client's retry after a restart delivers it exactly
    once.
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server(*SMTP_OPTIONS)
    acknowledged = headers("acknowledged") + b"\r\nthis one got its 250\r\n"
    client = smtpClient(server)
    assert client.sendmail(SENDER, [ALICE], acknowledged) == {}
    client.quit()
    before = mailgate_cli.mailbox(ALICE)
    assert len(before) == 1

    interrupted = bigMessage(2 * 1024 * 1024)
    wire = smtpWire(server)
    assert wire.command(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert wire.command(f"RCPT TO:<{ALICE}>")[0] == 250
    assert wire.command("DATA")[0] == 354
    # Half the message (dot-stuffed as on the wire), and no end of data.
    half = interrupted[: len(interrupted) // 2]
    half = half[: half.rindex(b"\r\n") + 2]
    wire.send(re.sub(rb"(?m)^\.", b"..", half))
    # Still mid-DATA: the server has not answered anything.
    wire.sock.settimeout(0.2)
    with pytest.raises(socket.timeout):
        wire.sock.recv(1)
    wire.sock.settimeout(DEADLINE)

    server.process.send_signal(signal.SIGKILL)
    assert server.wait() == -signal.SIGKILL
    try:
        assert wire.sock.recv(1) == b""
    except ConnectionResetError:
        pass
    wire.sock.close()

    assert mailgate_cli.mailbox(ALICE) == before
    server = mailgate_server(*SMTP_OPTIONS)
    client = popLogin(server, ALICE)
    assert client.stat() == (1, before[0][1])
    client.quit()

    # The client tries again, now to the restarted server.
    client = smtpClient(server)
    assert client.sendmail(SENDER, [ALICE], interrupted) == {}
    client.quit()
    rows = mailgate_cli.mailbox(ALICE)
    assert len(rows) == 2 and rows[0] == before[0]
    stored = fetchAll(server, ALICE)
    assert len(stored) == 2
    assertDelivered(stored[0], acknowledged, SENDER, recipient=ALICE)
    assertDelivered(stored[1], interrupted, SENDER, recipient=ALICE)


def _sendAllThenHalfClose(port, wire):
    """
    What C{printf ... | nc -N} does: send everything, close the sending
    side, read until the server closes.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(wire)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        for _ in range(1000):
            chunk = sock.recv(65536)
            if not chunk:
                return answer.decode()
            answer += chunk
    raise AssertionError(f"the server did not close: {answer!r}")


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_aClientThatHalfClosesGetsEveryReply(shared, protocol):
    """
    A client sends a whole transaction and QUIT, then closes its side of
    the connection without waiting: the message is stored once and the
    client gets every reply, the 250 for its message and the 221 among
    them (closed at once, the client would not know its message was
    taken, and send it again).
    """
    server = shared(*SMTP_OPTIONS, "--lmtp", LOOPBACK_TCP)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    mailgate_cli.addUser(alice, ALICE_PW)
    hello = "LHLO" if protocol == "lmtp" else "EHLO"
    message = headers("half-closed") + b"\r\nsent, then the end of input\r\n"
    wire = (
        f"{hello} {CLIENT}\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{alice}>\r\nDATA\r\n".encode()
        + message + b".\r\nQUIT\r\n"
    )
    answer = _sendAllThenHalfClose(server.portOf(protocol.upper()), wire)
    codes = [line[:4] for line in answer.splitlines() if line[3:4] == " "]
    assert codes == ["220 ", "250 ", "250 ", "250 ", "354 ", "250 ", "221 "], answer
    stored = fetchAll(server, alice, ALICE_PW)
    assert len(stored) == 1
    assertDelivered(stored[0], message, SENDER, protocol=protocol.upper() if protocol == "lmtp" else "ESMTP", recipient=alice)

    # An unfinished message before the end of input is not stored.
    answer = _sendAllThenHalfClose(
        server.portOf(protocol.upper()),
        f"{hello} {CLIENT}\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{alice}>\r\nDATA\r\n".encode() + message,
    )
    assert answer.splitlines()[-1].startswith("354 "), answer
    assert len(fetchAll(server, alice, ALICE_PW)) == 1


def test_aPop3ClientThatHalfClosesGetsEveryReply(shared):
    server = shared(*SMTP_OPTIONS, "--lmtp", LOOPBACK_TCP)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    mailgate_cli.addUser(alice, ALICE_PW)
    mailgate_cli.deliver(alice, b"Subject: one\r\n\r\nbody\r\n")
    answer = _sendAllThenHalfClose(
        server.port, f"USER {alice}\r\nPASS {ALICE_PW}\r\nSTAT\r\nDELE 1\r\nQUIT\r\n".encode()
    )
    lines = answer.splitlines()
    assert [line.split(" ")[0] for line in lines] == ["+OK"] * 6, answer
    assert lines[3].startswith("+OK 1 "), answer
    assert len(mailgate_cli.mailbox(alice)) == 0


def test_mailToPostmasterReachesTheConfiguredUser(mailgate_server, mailgate_cli):
    """
    RFC 5321 section 4.5.1: an SMTP server accepts mail for <postmaster>,
    without a domain: with --postmaster, smtplib's message reaches that
    user's maildrop.
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server(*SMTP_OPTIONS, "--postmaster", ALICE)
    message = headers("for the postmaster", to="postmaster") + b"\r\nabuse report\r\n"
    client = smtpClient(server)
    assert client.sendmail(SENDER, ["postmaster"], message) == {}
    client.quit()
    [stored] = fetchAll(server, ALICE)
    assertDelivered(stored, message, SENDER, recipient=ALICE)


def test_anSMTPListenerWithoutAPostmasterIsWarnedOfAtStart(mailgate_server, mailgate_cli):
    """
    Without --postmaster, mail to postmaster is refused, which RFC 5321
    does not allow an SMTP server: the start-up log says so, once, and
    not where --postmaster is given.
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    warning = "SMTP listens without --postmaster"
    warned = mailgate_server(*SMTP_OPTIONS)
    waitFor(lambda: warning in warned.stdout, what="the postmaster warning")
    warned.stop()
    assert warned.stdout.count(warning) == 1
    told = mailgate_server(*SMTP_OPTIONS, "--postmaster", ALICE)
    # A line the running reactor writes, after the start-up's own.
    told.process.send_signal(signal.SIGHUP)
    waitFor(lambda: "SIGHUP: nothing to reload" in told.stdout, what="the SIGHUP line")
    assert warning not in told.stdout


# -- 5. the README's .tac example ------------------------------------------------


def readmeTac():
    """
    The Python code block that follows "This `.tac` file" in README.md.
    """
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    marker = "This `.tac` file"
    assert marker in readme
    match = re.search(r"```python\n(.*?)```", readme.split(marker, 1)[1], re.S)
    assert match, "no python code block after the .tac paragraph"
    return match.group(1)


class TacProcess(ServerProcess):
    """
    C{twistd -n -y FILE.tac} with extra environment variables, waiting for
    mailgate's POP3 and SMTP listeners like L{ServerProcess} does.
    """

    def __init__(self, tac, environment, cwd):
        super().__init__(environment["MAILGATE_DATABASE"], cwd=cwd)
        self.tac = tac
        self.environment = environment

    @property
    def argv(self):
        variables = [f"{name}={value}" for name, value in self.environment.items()]
        return [shutil.which("env"), *variables, TWISTD, "-n", "--pidfile=", "-y", str(self.tac)]

    def _expectedListeners(self):
        return {"POP3": 1, "SMTP": 1}


def test_readmeTacExample(tmp_path):
    """
    The README's C{.tac} file runs mailgate beside a web site in one
    twistd process: the site answers, and mail sent over SMTP is fetched
    over POP3 from the same process.
    """
    tac = tmp_path / "mailgate.tac"
    tac.write_text(readmeTac(), encoding="utf-8")
    database = databaseURL(tmp_path / "tac.sqlite3")
    environment = {
        "WEB": LOOPBACK_TCP,
        "POP3": LOOPBACK_TCP,
        "SMTP": LOOPBACK_TCP,
        "MAILGATE_DATABASE": database,
    }
    process = TacProcess(tac, environment, cwd=tmp_path)
    try:
        process.start()
        cli = AdminCommand(database, cwd=tmp_path)
        cli.addUser(ALICE, ALICE_PW)
        client = smtpClient(process)
        # The .tac sets no hostname: the server uses the machine's name,
        # as its greeting says.
        hostname = client.greeting.split()[0].decode()
        assert client.sendmail(SENDER, [ALICE], PLAIN) == {}
        client.quit()
        [stored] = fetchAll(process, ALICE)
        assertDelivered(stored, PLAIN, SENDER, recipient=ALICE, byHost=hostname)
        assert [row[1] for row in cli.mailbox(ALICE)] == [len(stored)]

        # The host application's page, served by the same reactor.
        site = waitFor(
            lambda: re.search(r"\bSite starting on (\d+)", process.stdout), "the web site to listen"
        )
        url = f"http://127.0.0.1:{site.group(1)}/"
        try:
            with urllib.request.urlopen(url, timeout=DEADLINE) as page:
                status, body = page.status, page.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        assert (status, body) == (200, b"the host application\n"), (
            f"GET {url} of the README's .tac answered {status} {body[:200]!r}"
        )
    finally:
        status = process.stop()
    assert status in (0, -signal.SIGTERM), process.log()
    assert "Server Shut Down." in process.stdout, process.log()
    assert not _LOGGED_ERROR.search(process.stdout + process.stderr), process.log()


# -- 6. SMTP and POP3 in one process do not hold each other up -------------------


def test_smtpAndPop3DoNotBlockEachOther(shared):
    """
    An SMTP session stopped in the middle of DATA does not hold up a POP3
    session; a POP3 session holding the maildrop does not hold up delivery
    to it.
    """
    server = shared(*SMTP_OPTIONS, "--lmtp", LOOPBACK_TCP)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    mailgate_cli.addUser(alice, ALICE_PW)
    waiting = headers("waiting") + b"\r\nalready here\r\n"
    mailgate_cli.deliver(alice, waiting)

    held = headers("held open") + b"\r\nfirst part\r\nsecond part, cut in the mid"
    wire = smtpWire(server)
    assert wire.command(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert wire.command(f"RCPT TO:<{alice}>")[0] == 250
    assert wire.command("DATA")[0] == 354
    wire.send(held)

    client = popLogin(server, alice, ALICE_PW)
    assert client.stat() == (1, len(waiting))
    assert client.list()[1] == [b"1 %d" % len(waiting)]
    assert retrieve(client, 1) == waiting
    assert client.quit().startswith(b"+OK")

    wire.send(b"dle of a line\r\n.\r\n")
    code, texts = wire.reply()
    assert code == 250, texts

    # Now the other way round: a POP3 session holds the maildrop while
    # SMTP delivers to it.
    client = popLogin(server, alice, ALICE_PW)
    assert client.stat()[0] == 2
    meanwhile = headers("meanwhile") + b"\r\nwhile a session was open\r\n"
    assert wire.command(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert wire.command(f"RCPT TO:<{alice}>")[0] == 250
    assert wire.command("DATA")[0] == 354
    wire.send(meanwhile + b".\r\n")
    code, texts = wire.reply()
    assert code == 250, texts
    # The open session works on its snapshot; the next one sees it.
    assert client.stat()[0] == 2
    assert client.quit().startswith(b"+OK")
    assert wire.command("QUIT")[0] == 221

    stored = fetchAll(server, alice, ALICE_PW)
    assert len(stored) == 3
    assert stored[0] == waiting
    assertDelivered(stored[1], held + b"dle of a line\r\n", SENDER, recipient=alice)
    assertDelivered(stored[2], meanwhile, SENDER, recipient=alice)


@sqliteOnly
def test_largeMessagesAreSpooledInTheSpoolDirectory(mailgate_server, mailgate_cli, tmp_path):
    """
    --spool-directory (Dovecot's mail_temp_dir): a message that outgrows
    memory while it arrives is spooled there, in a file with no name that
    the server's descriptor still holds, and is delivered whole; a
    directory that cannot be used stops start-up with its reason, exit 78.
    """
    import os

    mailgate_cli.addUser(ALICE, ALICE_PW)
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    server = mailgate_server(*SMTP_OPTIONS, "--spool-directory", str(spool))
    body = b"".join(b"line %07d of a large message\r\n" % n for n in range(80_000))  # 2.6 MB
    message = headers("large") + b"\r\n" + body

    def spooledThere():
        for fd in os.listdir(f"/proc/{server.process.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{server.process.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(f"{spool}/") and target.endswith("(deleted)"):
                return target
        return None

    with socket.create_connection(("127.0.0.1", server.portOf("SMTP")), timeout=DEADLINE) as raw:
        replies = raw.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        raw.sendall(f"HELO {CLIENT}\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode())
        assert [replies.readline()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        raw.sendall(message)
        # The data is in, its end not yet: the spool holds it, there.
        waitFor(spooledThere, "a spool file in the spool directory")
        assert os.listdir(spool) == []
        raw.sendall(b".\r\n")
        assert replies.readline().startswith(b"250 ")
    [stored] = fetchAll(server, ALICE)
    assert stored.endswith(body)
    assert spooledThere() is None

    code, out, err = runCommand(
        [TWISTD, "-n", "--pidfile=", "mailgate", "--database", databaseURL(tmp_path / "other.sqlite3"),
         *SMTP_OPTIONS, "--spool-directory", str(tmp_path / "missing")],
        cwd=tmp_path,
    )
    assert code == 78, err
    assert f"mailgate: spool-directory: cannot spool messages in {tmp_path / 'missing'}: " in err
    assert "Traceback" not in err
