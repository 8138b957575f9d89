"""
A real Dovecot 2.3 LMTP proxy in front of mailgate's LMTP, with
C{--xclient-network} naming Dovecot's address (README: Receiving mail,
"The client behind the MTA"): mailgate's LHLO offers XCLIENT, and Dovecot,
which trusts the backends its passdb names (lib-smtp's client with
C{peer_trusted}), sends C{XCLIENT} with the client it had the message from
before its transaction, takes mailgate's new greeting, and sends LHLO
again.  The Received field mailgate writes (read back by POP3) names that
client (an MTA on 127.0.0.2) and the LHLO name it gave Dovecot, not
Dovecot; so do mailgate's log lines (C{lmtp.xclient}, the delivered line,
the session's end line, which names Dovecot as the proxy).

Base: test_dovecot_lmtp_proxy.py (the same private Dovecot, proxying
with C{lmtp_proxy = yes}; without the network, its test shows the
pairing unchanged).  mailgate runs with C{--debug-peer 127.0.0.1/32}: its
log traces what Dovecot sent, XCLIENT and all.
"""

import re
import smtplib

from dovecotserver import requireDovecot
from e2e import _LOGGED_ERROR, DEADLINE, popLogin, sqliteOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from test_dovecot_lmtp_proxy import PASSWORD, SENDER, dovecot, proxyFields  # noqa: F401 (fixture)
from test_metrics import sample, scrape

pytestmark = requireDovecot

ALICE = "alice@example.org"
#: the MTA that hands Dovecot the message: its address and LHLO name
MTA = "127.0.0.2"
MTA_NAME = "mta.example.net"
MESSAGE = b"From: <mta-sender@example.net>\r\nSubject: through Dovecot\r\n\r\nproxied by LMTP\r\n"


@sqliteOnly
def test_theClientDovecotRelayedIsNamed(mailgate_server, mailgate_cli, dovecot):
    server = mailgate_server(
        "--lmtp", "tcp:0:interface=127.0.0.1", "--domain", "example.org", "--no-apop",
        "--xclient-network", "127.0.0.1/32", "--debug-peer", "127.0.0.1/32",
        "--metrics", "tcp:0:interface=127.0.0.1",
    )
    mailgate_cli.addUser(ALICE, PASSWORD)
    dovecot.passdbFields = {ALICE: proxyFields(server.portOf("LMTP"))}
    dovecot.addUsers([ALICE], PASSWORD)
    dovecot.start()

    client = smtplib.LMTP(
        "127.0.0.1", dovecot.lmtpPort, local_hostname=MTA_NAME, source_address=(MTA, 0), timeout=DEADLINE
    )
    try:
        assert client.ehlo(MTA_NAME)[0] == 250
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(ALICE)[0] == 250
        code, text = client.data(MESSAGE)
        assert code == 250, text
    finally:
        client.quit()

    # What Dovecot sent: XCLIENT with the MTA's address and LHLO name,
    # answered by a new greeting, then LHLO again before the transaction.
    delivered = waitFor(
        lambda: re.search(r"^.* lmtp delivered .*$", server.stdout, re.MULTILINE), "mailgate's delivered line"
    ).group(0)
    log = server.stdout
    commands = re.findall(r"lmtp trace peer=\S+ C: (.*)$", log, re.MULTILINE)
    verbs = [command.split(" ", 1)[0].split(":", 1)[0].upper() for command in commands]
    assert verbs[:1] == ["LHLO"] and "XCLIENT" in verbs, commands
    last = len(verbs) - 1 - verbs[::-1].index("XCLIENT")
    assert verbs[last + 1:last + 3] == ["LHLO", "MAIL"], commands
    xclient = " ".join(command for command in commands if command.upper().startswith("XCLIENT "))
    assert f"ADDR={MTA}" in xclient and f"HELO={MTA_NAME}" in xclient, xclient
    assert re.search(r"lmtp trace peer=\S+ S: 220 \S+ LMTP mailgate ready", log), log
    # /metrics counts each of them taken.
    _, metrics = scrape(server)
    assert sample(
        metrics, "mailgate_xclient_commands_total", protocol="lmtp", command="XCLIENT", result="accepted"
    ) == verbs.count("XCLIENT"), metrics

    # mailgate's log names the MTA, and Dovecot as the proxy.
    [named] = re.findall(r"lmtp xclient peer=127\.0\.0\.2:\d+ proxy=127\.0\.0\.1:\d+ .*$", log, re.MULTILINE)
    assert f"helo={MTA_NAME}" in named, named
    assert re.search(r" peer=127\.0\.0\.2:\d+$", delivered), delivered

    # The Received field at the top of the stored message.
    pop = popLogin(server, ALICE, PASSWORD)
    try:
        _, lines, _ = pop.retr(1)
    finally:
        pop.quit()
    stored = b"\r\n".join(lines)
    assert re.match(
        rb"Return-Path: <[^>]*>\r\nDelivered-To: alice@example\.org\r\n"
        rb"Received: from mta\.example\.net \(\[127\.0\.0\.2\]\)\r\n\tby ",
        stored,
    ), stored[:400]
    assert stored.endswith(b"proxied by LMTP")

    # The session ended (Dovecot's QUIT): its end line names both.
    ended = waitFor(
        lambda: re.search(r"lmtp disconnect peer=127\.0\.0\.2:\d+ proxy=127\.0\.0\.1:\d+ ", server.stdout),
        "mailgate's end line of Dovecot's session",
    )
    assert ended
    assert dovecot.errorsLogged() == [], dovecot.log()
    assert not _LOGGED_ERROR.search(server.stdout + server.stderr), server.log()

