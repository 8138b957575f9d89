"""
TLS required for SMTP and LMTP intake, end to end: a real C{twistd
mailgate} with a certificate (L{certs}) and C{--smtp-cleartext-network} or
C{--lmtp-cleartext-network}, smtplib's SMTP and LMTP clients over
127.0.0.1, and a private Postfix delivering by LMTP with
C{lmtp_tls_security_level = encrypt}.

A client from 127.0.0.2 (all of 127.0.0.0/8 is loopback: another address
on this machine) is outside a cleartext network of 127.0.0.1/32: in the
clear its MAIL gets C{530 5.7.0}, after STARTTLS its mail goes in.  From
127.0.0.1 mail goes in without TLS.  Every wait is bounded (L{e2e.DEADLINE}).
"""

import smtplib
import socket
import ssl

import pytest

from certs import makeCertificate
from e2e import DEADLINE, LineReader, popLogin, retrieve, sqliteOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from test_pairings import PrivatePostfix, postfixRoot  # noqa: F401 (fixture)

ALICE = "alice@example.org"
ALICE_PW = "wonder land"
SENDER = "mta@relay.example.net"
LOOPBACK_TCP = "tcp:0:interface=127.0.0.1"
OUTSIDE = "127.0.0.2"
TLS_FIRST = (530, b"5.7.0 Must issue a STARTTLS command first")


@pytest.fixture
def certificate(tmp_path):
    directory = tmp_path / "tls"
    directory.mkdir()
    return makeCertificate(directory, "localhost", name="server")


def clientContext(certificatePath):
    return ssl.create_default_context(cadata=certificatePath.read_text())


def message(subject):
    return f"From: <{SENDER}>\r\nTo: <{ALICE}>\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()


def client(server, protocol, source):
    port = server.portOf(protocol.upper())
    kind = smtplib.LMTP if protocol == "lmtp" else smtplib.SMTP
    return kind("127.0.0.1", port, local_hostname="relay.example.net", source_address=(source, 0), timeout=DEADLINE)


def subjects(server):
    pop = popLogin(server, ALICE, ALICE_PW)
    count, _ = pop.stat()
    messages = [retrieve(pop, n) for n in range(1, count + 1)]
    pop.quit()
    return messages


@sqliteOnly  # TLS and the networks do not depend on the database
@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_mailFromOutsideTheNetworksNeedsSTARTTLS(mailgate_server, mailgate_cli, certificate, protocol):
    certificatePath, keyPath = certificate
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server(
        "--tls-cert", str(certificatePath), "--tls-key", str(keyPath), "--domain", "example.org",
        f"--{protocol}", LOOPBACK_TCP, f"--{protocol}-cleartext-network", "127.0.0.1/32",
    )
    context = clientContext(certificatePath)

    # In the clear from 127.0.0.2: refused at MAIL, the refusal logged.
    with client(server, protocol, OUTSIDE) as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            smtp.sendmail(SENDER, [ALICE], message("in the clear"))
        assert (e.value.smtp_code, e.value.smtp_error) == TLS_FIRST
        assert smtp.noop()[0] == 250
        # After STARTTLS (and LHLO/EHLO again) the same client's mail goes in.
        assert smtp.starttls(context=context)[0] == 220
        assert smtp.sendmail(SENDER, [ALICE], message("over TLS")) == {}
    refused = waitFor(
        lambda: [line for line in server.stdout.splitlines() if f"{protocol} sender refused" in line],
        "the refusal's log line",
    )
    assert len(refused) == 1 and f"from=<{SENDER}> peer={OUTSIDE}:" in refused[0], refused
    assert refused[0].endswith(": 530 5.7.0 TLS required"), refused

    # From 127.0.0.1, a cleartext network, mail goes in without TLS.
    with client(server, protocol, "127.0.0.1") as smtp:
        assert smtp.sendmail(SENDER, [ALICE], message("from loopback")) == {}

    stored = subjects(server)
    assert [m for m in stored if b"Subject: in the clear" in m] == []
    [overTLS] = [m for m in stored if b"Subject: over TLS" in m]
    [clear] = [m for m in stored if b"Subject: from loopback" in m]
    secure = "LMTPS" if protocol == "lmtp" else "ESMTPS"
    assert f" with {secure} id ".encode() in overTLS
    assert f" with {secure} id ".encode() not in clear


@sqliteOnly
@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_requiringTLSWithoutACertificateStopsTheStart(mailgate_server, protocol):
    refused = mailgate_server.spawn(f"--{protocol}", LOOPBACK_TCP, f"--{protocol}-cleartext-network", "none")
    assert refused.wait() == 78, refused.log()
    errors = [line for line in refused.stderr.splitlines() if line.strip()]
    assert errors == [
        f"mailgate: {protocol}-cleartext-network asks for STARTTLS from other networks, which needs tls-cert and "
        "tls-key (not set): without them all their mail would be refused (twistd mailgate --help lists the options)"
    ], refused.log()


@sqliteOnly
def test_networksThatSplitTheSpaceTakeMailFromEveryoneWithoutACertificate(mailgate_server, mailgate_cli):
    """
    0.0.0.0/1 and 128.0.0.0/1, ::/1 and 8000::/1 hold every address, as
    0.0.0.0/0 and ::/0 do: the server starts without a certificate (it
    exited 78, asking for one) and a client takes mail in the clear.
    """
    server = mailgate_server(
        "--smtp", LOOPBACK_TCP,
        *(a for n in ("0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1") for a in ("--smtp-cleartext-network", n)),
    )
    mailgate_cli.addUser(ALICE, ALICE_PW)
    with client(server, "smtp", OUTSIDE) as smtp:
        assert smtp.sendmail(SENDER, [ALICE], message("split networks")) == {}
    assert [m for m in subjects(server) if b"Subject: split networks" in m] != []


@sqliteOnly
def test_theRefusalsAreCountedInTheMetrics(mailgate_server, certificate):
    """
    A MAIL refused in the clear is counted in
    C{mailgate_senders_refused_total{reason="tls_required"}}, which a real
    scrape exports in a form promtool takes; before, no metric moved.
    """
    from test_metrics import promtoolCheck, sample, scrape

    certificatePath, keyPath = certificate
    server = mailgate_server(
        "--tls-cert", str(certificatePath), "--tls-key", str(keyPath), "--domain", "example.org",
        "--smtp", LOOPBACK_TCP, "--smtp-cleartext-network", "127.0.0.1/32",
        "--metrics", "tcp:0:interface=127.0.0.1",
    )
    with client(server, "smtp", OUTSIDE) as smtp:
        smtp.ehlo()
        assert smtp.mail(SENDER) == TLS_FIRST
    _, text = scrape(server)
    promtoolCheck(text)
    assert sample(text, "mailgate_senders_refused_total", protocol="smtp", reason="tls_required") == 1
    assert sample(text, "mailgate_senders_refused_total", protocol="lmtp", reason="tls_required") == 0


def mailThroughProxy(port, client):
    """
    The reply to MAIL in the clear on a haproxy: listener, from a balancer
    on 127.0.0.1 whose PROXY header names C{client}.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 25\r\n".encode())
        reader = LineReader(sock)
        assert reader.line().startswith(b"220 ")
        sock.sendall(b"EHLO relay.example.net\r\n")
        while not reader.line().startswith(b"250 "):
            pass
        sock.sendall(f"MAIL FROM:<{SENDER}>\r\nQUIT\r\n".encode())
        reply = reader.line()
        assert reader.line().startswith(b"221 ")
        return reply


@sqliteOnly
def test_behindABalancerTheClientsOwnAddressIsWhatCounts(mailgate_server, certificate):
    """
    On a haproxy: listener, the address the PROXY header names decides,
    not the balancer's (127.0.0.1, on the cleartext network).
    """
    certificatePath, keyPath = certificate
    server = mailgate_server(
        "--tls-cert", str(certificatePath), "--tls-key", str(keyPath), "--domain", "example.org",
        "--smtp", "haproxy:" + LOOPBACK_TCP, "--smtp-cleartext-network", "127.0.0.0/8",
    )
    port = server.portOf("SMTP")
    assert mailThroughProxy(port, "192.0.2.9") == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    assert mailThroughProxy(port, "127.0.0.9").startswith(b"250 ")


class EncryptingPostfix(PrivatePostfix):
    """
    The documented pairing's Postfix, its LMTP client told to deliver over
    TLS only.
    """

    mainCF = PrivatePostfix.mainCF + "lmtp_tls_security_level = encrypt\nlmtp_tls_loglevel = 1\n"
    masterCF = PrivatePostfix.masterCF + "tlsmgr     unix  - - n 1000? 1 tlsmgr\n"


@sqliteOnly
def test_postfixDeliversByLMTPOverSTARTTLS(mailgate_server, mailgate_cli, certificate, postfixRoot):  # noqa: F811
    """
    mailgate's LMTP takes mail from no network in the clear, Postfix with
    lmtp_tls_security_level = encrypt delivers over STARTTLS.
    """
    certificatePath, keyPath = certificate
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server(
        "--tls-cert", str(certificatePath), "--tls-key", str(keyPath), "--domain", "example.org",
        "--lmtp", LOOPBACK_TCP, "--lmtp-cleartext-network", "none",
    )
    # Loopback included: in the clear, Postfix's mail would not go in.
    with client(server, "lmtp", "127.0.0.1") as lmtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            lmtp.sendmail(SENDER, [ALICE], message("in the clear"))
        assert (e.value.smtp_code, e.value.smtp_error) == TLS_FIRST
    postfix = EncryptingPostfix(postfixRoot, server.portOf("LMTP"))
    try:
        postfix.start()
        with smtplib.SMTP("127.0.0.1", postfix.smtpPort, timeout=DEADLINE) as smtp:
            assert smtp.sendmail(SENDER, [ALICE], message("through Postfix over TLS")) == {}
        log = waitFor(
            lambda: (lambda text: text if "status=sent" in text else None)(postfix.maillog()),
            "Postfix to deliver the message",
        )
        sent = [line for line in log.splitlines() if f"to=<{ALICE}>" in line and "status=sent" in line]
        assert len(sent) == 1, log
        # "Untrusted": encrypt does not check the certificate.
        assert f"TLS connection established to 127.0.0.1[127.0.0.1]:{server.portOf('LMTP')}: TLSv1." in log, log
    finally:
        postfix.stop()
    [stored] = subjects(server)
    assert b"Subject: through Postfix over TLS" in stored
    assert b" with LMTPS id " in stored
    # Postfix's cached connection ends as it stops: its end line comes
    # once the server has read the close, which a loaded machine delays.
    ends = waitFor(
        lambda: [
            line for line in server.stdout.splitlines() if "lmtp disconnect" in line and "helo=<postfix.test>" in line
        ],
        "the end line of Postfix's LMTP session",
    )
    assert all(" tls=yes " in line for line in ends), ends
