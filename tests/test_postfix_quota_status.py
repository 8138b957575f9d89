"""
A real Postfix asking mailgate's quota-status service (C{--quota-status},
README: Quotas, "Refused at Postfix's RCPT") at its own RCPT, with
C{check_policy_service} in C{smtpd_recipient_restrictions}, and
delivering by LMTP into mailgate (the pairing of test_pairings).

A sender's MTA (smtplib, declaring SIZE as it does whenever the server
offers it) gets Postfix's refusal at RCPT for a recipient whose mailbox
is full: nothing is queued, nothing bounced later.  A recipient with room
gets the message through Postfix and mailgate's LMTP, read back by POP3.
"""

import os
import re
import smtplib
import urllib.request

import pytest

from e2e import DEADLINE, popLogin, sqliteOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from test_pairings import MAIN_CF, PrivatePostfix, postfixRoot  # noqa: F401 (fixtures)

FULL = "full@example.org"
ROOMY = "roomy@example.org"
PASSWORD = "a secret"
#: README's restriction list, with the test's port for 12340
RESTRICTIONS = (
    "smtpd_recipient_restrictions =\n"
    "    reject_unauth_destination,\n"
    "    check_policy_service inet:127.0.0.1:12340,\n"
    "    permit_mynetworks\n"
)

#: the pairing's own, which it replaces
PAIRING_RESTRICTIONS = "smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination\n"


class AskingPostfix(PrivatePostfix):
    """
    The pairing's Postfix, asking the quota-status service on
    C{policyPort} at RCPT: README's restrictions in place of MAIN_CF's.
    """

    def __init__(self, root, lmtpPort, policyPort):
        super().__init__(root, lmtpPort)
        assert MAIN_CF.count(PAIRING_RESTRICTIONS) == 1
        self.mainCF = MAIN_CF.replace(PAIRING_RESTRICTIONS, RESTRICTIONS.replace("12340", str(policyPort)))


def message(subject, body=b"hello\r\n"):
    return b"From: someone@elsewhere.test\r\nSubject: " + subject.encode() + b"\r\n\r\n" + body


@sqliteOnly
@pytest.mark.parametrize("quotaExceeded, code, enhanced", [("permanent", 552, "5.2.2"), ("temporary", 452, "4.2.2")])
def test_aFullMailboxIsRefusedAtPostfixsRCPT(mailgate_server, mailgate_cli, postfixRoot, quotaExceeded, code, enhanced):
    server = mailgate_server(
        "--lmtp", "tcp:0:interface=127.0.0.1", "--quota-status", "tcp:0:interface=127.0.0.1", "--no-apop",
        "--quota-exceeded", quotaExceeded,
    )
    mailgate_cli.addUser(FULL, PASSWORD)
    mailgate_cli.addUser(ROOMY, PASSWORD)
    mailgate_cli.deliver(FULL, message("filling", b"x" * 3000 + b"\r\n"))
    mailgate_cli.check("user", "quota", FULL, "2000")
    mailgate_cli.check("user", "quota", ROOMY, "1M")
    postfix = AskingPostfix(postfixRoot, server.portOf("LMTP"), server.portOf("QUOTA-STATUS"))
    try:
        postfix.start()
        with smtplib.SMTP("127.0.0.1", postfix.smtpPort, local_hostname="mx.elsewhere.test", timeout=DEADLINE) as smtp:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                smtp.sendmail("someone@elsewhere.test", [FULL], message("refused"))
            # One of two refused, the other taken: as per recipient as
            # mailgate's own RCPT.
            partly = smtp.sendmail("someone@elsewhere.test", [FULL, ROOMY], message("for the roomy one"))
        log = waitFor(
            lambda: (lambda text: text if f"to=<{ROOMY}>" in text and "status=sent" in text else None)(
                postfix.maillog()
            ),
            "Postfix to deliver the message by LMTP",
        )
    finally:
        postfix.stop()

    [(replyCode, replyText)] = refused.value.recipients.values()
    assert (replyCode, replyText.decode()) == (
        code, f"{enhanced} <{FULL}>: Recipient address rejected: mailbox full"
    )
    assert list(partly) == [FULL] and partly[FULL][0] == code
    # Refused at RCPT, never queued: nothing to bounce days later.
    assert re.search(rf"NOQUEUE: reject: RCPT from \S+: {code} {enhanced} <{FULL}>: Recipient address rejected", log)
    assert not [line for line in log.splitlines() if f"to=<{FULL}>" in line and "status=" in line], log
    # The size smtplib declared reached mailgate, which logged the answer.
    answers = re.findall(
        rf"quota-status overquota recipient=<{re.escape(FULL)}> size=(\d+) action={code} {enhanced} mailbox full ",
        server.stdout,
    )
    assert len(answers) == 2 and all(int(size) > 0 for size in answers), server.stdout

    pop = popLogin(server, ROOMY, PASSWORD)
    try:
        _, lines, _ = pop.retr(1)
    finally:
        pop.quit()
    assert b"Subject: for the roomy one" in lines
    assert mailgate_cli.mailbox(FULL)[0][0] == 1 and len(mailgate_cli.mailbox(FULL)) == 1


def test_theReadmeGivesTheseSettings():
    """
    README's section names the restriction and the option this test runs
    Postfix and mailgate with.
    """
    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("### Refused at Postfix's RCPT"):]
    section = section[:section.index("\n## ")]
    assert RESTRICTIONS in section
    assert "--quota-status tcp:12340:interface=127.0.0.1" in section


def test_theReadmesMainCfIsValid(tmp_path):
    """
    postconf reads the section's main.cf lines without a warning, as they
    are written.
    """
    from test_readme import checked, codeBlocks, postfixDirectory, section

    [main] = [b for b in codeBlocks(section("Quotas")) if "/etc/postfix/main.cf" in b]
    settings = checked(["postconf", "-n", "-c", str(postfixDirectory(tmp_path, main))], "main.cf")
    assert "check_policy_service inet:127.0.0.1:12340" in settings
    assert "smtpd_policy_service_default_action = DUNNO" in settings
    assert "warning" not in settings


def policyAnswer(port, recipient, size):
    """
    One policy request over a real socket, as Postfix's smtpd sends it;
    the action answered.
    """
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        return askOn(sock, recipient, size)


def askOn(sock, recipient, size):
    """
    One policy request on the connection C{sock}, which stays open; the
    action answered.
    """
    sock.sendall(policyRequest(recipient, size))
    answer = b""
    while not answer.endswith(b"\n\n"):
        piece = sock.recv(4096)
        assert piece, answer
        answer += piece
    assert answer.startswith(b"action=") and answer.count(b"\n") == 2, answer
    return answer[len(b"action="):-2].decode()


def policyRequest(recipient, size):
    return f"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient={recipient}\nsize={size}\n\n".encode()


@sqliteOnly
def test_aReloadAppliesQuotaExceededAndTheActions(mailgate_server, mailgate_cli, tmp_path):
    """
    quota-exceeded, changed by a reload, changes quota-status's answer as
    it changes RCPT's, and a changed quota-status-overquota is the answer
    after the reload; a changed quota-status-network waits for the
    restart, and says so.  quota-status-max-connections lowered to 1 by
    the reload: while one connection is open, the next is closed
    unanswered, and counted.
    """
    import socket

    from test_reload_policy import configured, reload, writeConfig

    server, path = configured(
        mailgate_server, tmp_path, "--quota-status", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1"
    )
    mailgate_cli.addUser(FULL, PASSWORD)
    mailgate_cli.deliver(FULL, message("filling", b"x" * 3000 + b"\r\n"))
    mailgate_cli.check("user", "quota", FULL, "2000")
    port = server.portOf("QUOTA-STATUS")
    assert policyAnswer(port, FULL, 100) == "452 4.2.2 mailbox full"
    writeConfig(
        path, quota_exceeded='"permanent"', quota_status_overquota='"552 5.2.2 Mailbox is full"',
        quota_status_max_connections="1", quota_status_network='["127.0.0.0/8"]',
    )
    line = reload(server)
    assert "applied quota-exceeded, quota-status-max-connections, quota-status-overquota" in line, server.log()
    assert re.search(r"configuration changed: quota-status-network takes effect at the next restart", server.stdout)
    metrics = f"http://127.0.0.1:{server.portOf('METRICS')}"
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as held:
        assert askOn(held, FULL, 100) == "552 5.2.2 Mailbox is full"
        assert closedWithoutAnswer(port, policyRequest(FULL, 100)) == b""
        # The one held open is the one the gauge shows (not the refused).
        with urllib.request.urlopen(metrics + "/metrics", timeout=DEADLINE) as answer:
            assert 'mailgate_connections{protocol="quota-status"} 1.0' in answer.read().decode()

    # The node's health for quota-status, and the answers counted.
    with urllib.request.urlopen(metrics + "/healthz/quota-status", timeout=DEADLINE) as answer:
        assert (answer.status, answer.read()) == (200, b"ok\n")
    with urllib.request.urlopen(metrics + "/metrics", timeout=DEADLINE) as answer:
        exposition = answer.read().decode()
    assert 'mailgate_quota_status_answers_total{result="overquota"} 2.0' in exposition
    assert 'mailgate_connections_refused_total{protocol="quota-status",reason="too_many"} 1.0' in exposition


def closedWithoutAnswer(port, data):
    """
    Whether the server closes a connection that sent C{data}, answering
    nothing: what is read until the end.
    """
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(data)
        received = b""
        while True:
            piece = sock.recv(4096)
            if not piece:
                return received
            received += piece


@sqliteOnly
def test_garbageAndStrangersAreClosedOverARealSocket(mailgate_server, mailgate_cli):
    """
    A line that is no attribute closes the connection, logged as such and
    without a traceback, and the next connection is answered; with
    --quota-status-network naming other networks, a loopback peer is
    closed unread.
    """
    server = mailgate_server("--quota-status", "tcp:0:interface=127.0.0.1")
    mailgate_cli.addUser(FULL, PASSWORD)
    port = server.portOf("QUOTA-STATUS")
    assert closedWithoutAnswer(port, b"request=smtpd_access_policy\nHELO there\n\n") == b""
    waitFor(lambda: "quota-status closing the connection" in server.stdout, "the bad_input line")
    assert re.search(r"quota-status closing the connection peer=127\.0\.0\.1:\d+: a line that is not name=value",
                     server.stdout), server.stdout
    assert policyAnswer(port, FULL, 10) == "DUNNO"
    assert "Traceback" not in server.stdout + server.stderr
    # A connection kept open, as Postfix keeps one, does not hold up the
    # stop (SIGTERM, not the SIGKILL after the grace), and ends with it.
    import signal
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as kept:
        kept.sendall(f"request=smtpd_access_policy\nrecipient={FULL}\n\n".encode())
        assert kept.recv(4096) == b"action=DUNNO\n\n"
        assert server.stop() in (0, -signal.SIGTERM), server.log()
        assert kept.recv(4096) == b""

    fenced = mailgate_server("--quota-status", "tcp:0:interface=127.0.0.1", "--quota-status-network", "10.0.0.0/8")
    port = fenced.portOf("QUOTA-STATUS")
    assert closedWithoutAnswer(port, f"request=smtpd_access_policy\nrecipient={FULL}\n\n".encode()) == b""
    waitFor(lambda: "quota-status connection refused" in fenced.stdout, "the refusal's line")
    assert re.search(
        r"quota-status connection refused peer=127\.0\.0\.1:\d+ reason=not on quota-status-network", fenced.stdout
    ), fenced.stdout
