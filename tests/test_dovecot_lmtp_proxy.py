"""
Dovecot's LMTP proxying users to mailgate: the pairing of a site moving
from Dovecot that keeps its MTA pointed at Dovecot's LMTP and moves users
to mailgate one by one (README: Receiving mail).

A private Dovecot (tests/dovecotserver.py) runs its LMTP with
C{lmtp_proxy = yes}; its passdb gives the moved users C{proxy=y
host=127.0.0.1 port=N} (mailgate's LMTP), one user has none and is
delivered by Dovecot itself.  Dovecot's LMTP proxy is lib-smtp's client,
which sends a message in BDAT chunks when the server's LHLO offers
CHUNKING: the one real client here that sends BDAT by itself (Postfix's
LMTP and SMTP clients send DATA).  mailgate runs with C{--debug-peer
127.0.0.1/32}, so its log traces every command Dovecot sent.

Messages go in by smtplib.LMTP to Dovecot, as an MTA sends them, and what
is checked is what each party sees: the reply codes the MTA got per
recipient (an address mailgate does not know is refused at RCPT by
mailgate, and Dovecot hands the MTA mailgate's 550 5.1.1), that Dovecot
sent each proxied message to mailgate as C{BDAT ... LAST} (several chunks
for a long one) and never DATA, each proxied message read back by POP3
from mailgate octet for octet as sent (dot lines and a line of hundreds of
kilobytes intact) once the trace fields at its top are taken off, and the
local user's copies in Dovecot's own maildir.
"""

import os
import poplib
import re
import smtplib

import pytest

from dovecotserver import PrivateDovecot, requireDovecot
from e2e import _LOGGED_ERROR, DEADLINE, sqliteOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from test_lmtp_vs_dovecot import withoutTrace

pytestmark = requireDovecot

ALICE = "alice@example.org"
BOB = "bob@example.org"
#: Dovecot's own user: not proxied
CAROL = "carol@example.org"
#: proxied to mailgate by Dovecot's passdb, unknown to mailgate
NOBODY = "nobody@example.org"
PASSWORD = "wonder land"
SENDER = "mta-sender@example.net"

#: what Dovecot's configuration needs to proxy (README, Receiving mail)
LMTP_PROXY = "lmtp_proxy = yes\n"


def proxyFields(port):
    """
    The passdb extra fields that send a user's mail to mailgate's LMTP.
    """
    return f"proxy=y host=127.0.0.1 port={port}"


SMALL = b"From: <mta-sender@example.net>\r\nSubject: small\r\n\r\nA small message.\r\n"
#: Lines starting with a dot (the MTA dot-stuffs them for Dovecot's DATA,
#: Dovecot unstuffs them and sends them as they are in BDAT chunks), and
#: one line of 300 KB: longer than Dovecot's chunks.
LONG_LINE = b"y" * 300_000
DOTS_AND_LONG = (
    b"From: <mta-sender@example.net>\r\nSubject: dots and a long line\r\n\r\n"
    b".\r\n..\r\n.leading dot\r\n...three\r\n. \r\n"
    + LONG_LINE + b"\r\n"
    b".\r\nlast line\r\n"
)
SHARED = b"From: <mta-sender@example.net>\r\nSubject: for three\r\n\r\nTwo at mailgate, one at Dovecot.\r\n"

_TRACED_COMMAND = re.compile(r"lmtp trace peer=\S+ C: (.*)$", re.MULTILINE)
_BDAT = re.compile(r"^BDAT ([0-9]+)( LAST)?$")


def transaction(client, recipients, message):
    """
    One LMTP transaction as an MTA runs it: MAIL, RCPT for each recipient,
    and (if any was accepted) DATA and one reply per accepted recipient,
    in RCPT order (RFC 2033 section 4.2; smtplib's C{sendmail} would read
    only the first).  Returns C{{"RCPT": {address: code}, "DATA":
    {address: code}}} and the RCPT replies' texts.
    """
    code, text = client.mail(SENDER)
    assert code == 250, (code, text)
    rcpt, texts = {}, {}
    for address in recipients:
        rcpt[address], texts[address] = client.rcpt(address)
    accepted = [address for address in recipients if rcpt[address] == 250]
    data = {}
    if accepted:
        data[accepted[0]] = client.data(message)[0]
        for address in accepted[1:]:
            data[address] = client.getreply()[0]
    else:
        client.rset()
    return {"RCPT": rcpt, "DATA": data}, texts


def tracedTransactions(log):
    """
    The commands mailgate's trace shows from its clients, cut into
    transactions (each from its MAIL on): C{[(recipients, data commands)]},
    the data commands being every one that is neither MAIL, RCPT, LHLO,
    RSET, NOOP nor QUIT.
    """
    transactions = []
    for command in _TRACED_COMMAND.findall(log):
        verb = command.split(" ", 1)[0].split(":", 1)[0].upper()
        if verb == "MAIL":
            transactions.append(([], []))
        elif verb == "RCPT":
            transactions[-1][0].append(command.split(":", 1)[1].strip().strip("<>"))
        elif verb not in ("LHLO", "RSET", "NOOP", "QUIT"):
            transactions[-1][1].append(command)
    return transactions


def belowMailgatesTrace(stored):
    """
    A message mailgate stored, without the three fields it puts at the top
    (C{Return-Path:}, the copy's C{Delivered-To:} and its C{Received:}):
    what its client sent.
    """
    match = re.match(
        rb"Return-Path: [^\r\n]*\r\nDelivered-To: [^\r\n]*\r\n"
        rb"Received: from dovecot\.bench\.test [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*",
        stored,
    )
    assert match, stored[:600]
    return stored[match.end():]


def chunkSizes(commands):
    """
    The sizes of a transaction's BDAT chunks, checking they are all BDAT
    and only the last is marked LAST.
    """
    matches = [_BDAT.match(command) for command in commands]
    assert commands and all(matches), commands
    assert [bool(m.group(2)) for m in matches] == [False] * (len(matches) - 1) + [True], commands
    return [int(m.group(1)) for m in matches]


def popMessages(port, address, monkeypatch):
    """
    Every message of a maildrop, as POP3 RETR gives it (dot-stuffing
    undone, lines ending CRLF).
    """
    # The 300 KB line (poplib refuses lines over 2048 octets by default).
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)
    client = poplib.POP3("127.0.0.1", port, timeout=DEADLINE)
    try:
        client.user(address)
        client.pass_(PASSWORD)
        count = client.stat()[0]
        return [b"".join(line + b"\r\n" for line in client.retr(n)[1]) for n in range(1, count + 1)]
    finally:
        client.quit()


@pytest.fixture
def dovecot():
    """
    A private Dovecot whose LMTP proxies (the test gives the users' passdb
    fields, once it knows mailgate's port, and starts it).
    """
    instance = PrivateDovecot(extra=LMTP_PROXY)
    yield instance
    instance.cleanup()


@sqliteOnly
def test_dovecotProxiesByBDAT(mailgate_server, mailgate_cli, dovecot, monkeypatch):
    """
    Dovecot's LMTP proxy, a real client that sends BDAT by itself, delivers
    into mailgate: chunks, per-recipient replies and the stored octets as
    an MTA behind Dovecot relies on them.
    """
    server = mailgate_server(
        "--lmtp", "tcp:0:interface=127.0.0.1", "--domain", "example.org", "--debug-peer", "127.0.0.1/32",
    )
    mailgate_cli.addUser(ALICE, PASSWORD)
    mailgate_cli.addUser(BOB, PASSWORD)
    lmtpPort = server.portOf("LMTP")
    dovecot.passdbFields = {address: proxyFields(lmtpPort) for address in (ALICE, BOB, NOBODY)}
    dovecot.addUsers([ALICE, BOB, CAROL, NOBODY], PASSWORD)
    dovecot.start()

    client = smtplib.LMTP("127.0.0.1", dovecot.lmtpPort, timeout=DEADLINE)
    try:
        code, _ = client.ehlo("mta.example.net")
        assert code == 250
        small, _ = transaction(client, [ALICE], SMALL)
        long, _ = transaction(client, [ALICE, CAROL], DOTS_AND_LONG)
        shared, _ = transaction(client, [ALICE, BOB, CAROL], SHARED)
        unknown, texts = transaction(client, [NOBODY], SMALL)
    finally:
        client.quit()

    # (4) The replies the MTA got, per recipient: every known one
    # delivered, proxied or not; the one mailgate does not know refused at
    # RCPT with mailgate's own permanent reply, passed on by Dovecot.
    assert small == {"RCPT": {ALICE: 250}, "DATA": {ALICE: 250}}
    assert long == {"RCPT": {ALICE: 250, CAROL: 250}, "DATA": {ALICE: 250, CAROL: 250}}
    assert shared == {"RCPT": {ALICE: 250, BOB: 250, CAROL: 250}, "DATA": {ALICE: 250, BOB: 250, CAROL: 250}}
    assert unknown == {"RCPT": {NOBODY: 550}, "DATA": {}}
    assert texts[NOBODY].startswith(b"5.1.1 ") and b"no such user" in texts[NOBODY], texts

    # (1) Dovecot sent every proxied message in BDAT chunks, never DATA:
    # one chunk for a small message, several for the long one (Dovecot
    # cuts them at 128 KiB), and nothing for the refused recipient.
    # The trace reaches the test through a thread reading the server's
    # output: wait (bounded) until it shows the refused recipient's RCPT,
    # which comes after everything else checked here.
    def tracedUpToTheRefusal():
        transactions = tracedTransactions(server.stdout)
        return len(transactions) >= 4 and transactions[3][0]

    waitFor(tracedUpToTheRefusal, "mailgate's trace of the fourth transaction's RCPT")
    log = server.stdout
    transactions = tracedTransactions(log)
    assert [recipients for recipients, _ in transactions] == [[ALICE], [ALICE], [ALICE, BOB], [NOBODY]], log
    assert not any(command.upper().startswith("DATA") for _, commands in transactions for command in commands), log
    assert transactions[3][1] == [], log
    sizes = [chunkSizes(commands) for _, commands in transactions[:3]]
    assert len(sizes[0]) == 1 and len(sizes[2]) == 1, sizes
    assert len(sizes[1]) >= 2, sizes

    # (2) Each proxied message is in the mailgate user's maildrop, octet
    # for octet as sent once the trace fields at its top are off.
    aliceMessages = popMessages(server.port, ALICE, monkeypatch)
    assert [withoutTrace(m) for m in aliceMessages] == [SMALL, DOTS_AND_LONG, SHARED]
    assert [withoutTrace(m) for m in popMessages(server.port, BOB, monkeypatch)] == [SHARED]
    # At the top, mailgate's Return-Path and Received (from Dovecot); below
    # them, exactly the octets of Dovecot's chunks: its own Received (from
    # the MTA) and the message.
    for stored, chunks in zip(aliceMessages, sizes):
        sent = belowMailgatesTrace(stored)
        assert re.match(rb"Received: from mta\.example\.net [^\r\n]*\r\n\tby dovecot\.bench\.test ", sent), stored[:600]
        assert len(sent) == sum(chunks), (stored[:600], chunks)

    # (3) The user Dovecot keeps has her copies in Dovecot's maildir (as
    # Dovecot stores them, lines ending LF); the proxied users have none.
    local = sorted(withoutTrace(open(path, "rb").read()) for path in dovecot.messageFiles(CAROL))
    assert local == sorted(m.replace(b"\r\n", b"\n") for m in (DOTS_AND_LONG, SHARED))
    for address in (ALICE, BOB, NOBODY):
        assert dovecot.messageFiles(address) == [], address

    assert dovecot.errorsLogged() == [], dovecot.log()
    assert not _LOGGED_ERROR.search(server.stdout + server.stderr), server.log()


def test_theReadmeShowsTheProxySettings():
    """
    The settings README.md gives for proxying from Dovecot's LMTP are the
    ones this test runs Dovecot with.
    """
    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8").read()
    assert LMTP_PROXY in readme
    assert proxyFields(2424) in readme
