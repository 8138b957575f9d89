"""
A real Postfix in front of mailgate's LMTP with
C{lmtp_send_xforward_command = yes} (README: Receiving mail, "The client
behind the MTA"): with C{--xclient-network} naming Postfix's address,
mailgate's LHLO offers XFORWARD, Postfix names the client each message
came from, and the Received field mailgate writes (read back by POP3)
names that client, its EHLO name and address, not Postfix; mailgate's
delivered line names the client, Postfix as the relay and Postfix's
queue id.  Without the network, the same Postfix still delivers: XFORWARD
is not offered, Postfix sends none, and the field names Postfix.

The client is smtplib on a socket bound to 127.0.0.3 (loopback, but not
the address Postfix itself connects to mailgate from).
"""

import os
import re
import smtplib

import pytest

from e2e import DEADLINE, popLogin, sqliteOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from test_metrics import sample, scrape
from test_pairings import MAIN_CF, PrivatePostfix, postfixRoot  # noqa: F401 (fixtures)

ALICE = "alice@example.org"
PASSWORD = "alice's secret"
CLIENT = "127.0.0.3"
CLIENT_HELO = "client.example.net"
#: the setting README gives for the pairing
XFORWARD_SETTING = "lmtp_send_xforward_command = yes\n"


class ForwardingPostfix(PrivatePostfix):
    """
    The pairing's Postfix, sending XFORWARD to an LMTP server that
    offers it.
    """

    mainCF = MAIN_CF + XFORWARD_SETTING


def received(message):
    """
    The first Received field of C{message} (lines as poplib gives them),
    unfolded: the one mailgate wrote.
    """
    text = b"\r\n".join(message).decode()
    match = re.search(r"^Received: (.*?)\r\n(?=\S)", text, re.MULTILINE | re.DOTALL)
    assert match, text[:600]
    return re.sub(r"\r\n[ \t]+", " ", match.group(1))


@sqliteOnly
@pytest.mark.parametrize("xclientNetwork", [True, False], ids=["offered", "not-offered"])
def test_theReceivedFieldNamesTheClientPostfixHadTheMessageFrom(
    mailgate_server, mailgate_cli, postfixRoot, xclientNetwork
):
    options = ["--xclient-network", "127.0.0.1/32"] if xclientNetwork else []
    # Traced (--debug-peer): the commands Postfix sent are in the log.
    server = mailgate_server(
        "--lmtp", "tcp:0:interface=127.0.0.1", "--no-apop", "--debug-peer", "127.0.0.1/32",
        "--metrics", "tcp:0:interface=127.0.0.1", *options,
    )
    mailgate_cli.addUser(ALICE, PASSWORD)
    postfix = ForwardingPostfix(postfixRoot, server.portOf("LMTP"))
    try:
        postfix.start()
        with smtplib.SMTP(
            "127.0.0.1", postfix.smtpPort, local_hostname=CLIENT_HELO, timeout=DEADLINE, source_address=(CLIENT, 0)
        ) as smtp:
            refused = smtp.sendmail(
                "bob@elsewhere.test", [ALICE], b"Subject: from behind Postfix\r\n\r\nrelayed by LMTP\r\n"
            )
        assert refused == {}
        log = waitFor(
            lambda: (lambda text: text if "status=sent" in text else None)(postfix.maillog()),
            "Postfix to deliver the message",
        )
    finally:
        postfix.stop()
    [sent] = [line for line in log.splitlines() if f"to=<{ALICE}>" in line and "status=sent" in line]
    queueId = re.search(r"postfix/lmtp\[\d+\]: (\w+): ", sent).group(1)

    pop = popLogin(server, ALICE, PASSWORD)
    try:
        _, message, _ = pop.retr(1)
    finally:
        pop.quit()
    field = received(message)
    assert b"relayed by LMTP" in b"\r\n".join(message)
    # What /metrics shows of it: Postfix's XFORWARD taken (in one
    # command or more, as long as its attributes are), none refused.
    _, metrics = scrape(server)
    xforward = {
        result: sample(metrics, "mailgate_xclient_commands_total", protocol="lmtp", command="XFORWARD", result=result)
        for result in ("accepted", "refused_network", "refused_sequence", "refused_syntax")
    }
    assert (xforward.pop("accepted") >= 1) == xclientNetwork, metrics
    assert xforward == dict.fromkeys(xforward, 0), xforward

    if xclientNetwork:
        # The client's EHLO name and address (with the name Postfix looked
        # up for it, if any), not Postfix's.
        assert re.match(rf"from {re.escape(CLIENT_HELO)} \((?:\S+ )?\[127\.0\.0\.3\]\) by ", field), field
        delivered = waitFor(
            lambda: re.search(r"^.*lmtp delivered .*$", server.stdout, re.MULTILINE), "mailgate's delivered line"
        ).group(0)
        assert re.search(
            rf" peer=127\.0\.0\.3:\d+ helo=<{re.escape(CLIENT_HELO)}> relay=127\.0\.0\.1:\d+ orig_queue_id={queueId}$",
            delivered,
        ), delivered
        assert re.search(r"lmtp trace peer=\S+ C: XFORWARD ", server.stdout), server.stdout
    else:
        assert re.match(r"from postfix\.test \(\[127\.0\.0\.1\]\) by ", field), field
        assert re.search(r"lmtp trace peer=\S+ C: MAIL FROM:", server.stdout), server.stdout
        assert "C: XFORWARD" not in server.stdout


def test_theReadmeGivesThisSetting():
    """
    README's pairing names the main.cf line and the option this test runs
    Postfix and mailgate with.
    """
    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("### The client behind the MTA"):]
    section = section[:section.index("\n## ")]
    assert XFORWARD_SETTING in section
    assert "--xclient-network 127.0.0.1/32" in section
