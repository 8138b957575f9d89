"""
End-to-end tests of TLS and SASL: a real C{twistd mailgate} process with a
certificate made by L{certs} (C{--tls-cert}/C{--tls-key}), and real clients
over 127.0.0.1 (poplib, smtplib, curl, raw sockets wrapped with Python's
C{ssl}) that verify the certificate as a user's client would.

Covered: STLS, implicit TLS (C{--pop3s}), SMTP STARTTLS, the plaintext
policy for a client outside C{--trusted-network}, AUTH PLAIN and
SCRAM-SHA-256 on the wire, and replacing the certificate at run time with
SIGHUP.  Every socket and process wait is bounded (see L{e2e.DEADLINE});
nothing asserts on wall-clock time.

The tests whose server is only the other end of their clients' exchanges
share one per set of options and backend (tests/sharedserver.py), each with
a maildrop of its own; those about an option, a log line, a reload or a
stop of their own start their own.
"""

import base64
import json
import os
import poplib
import re
import shutil
import signal
import smtplib
import socket
import ssl

import pytest

from certs import certificateFingerprint, makeCertificate
from saslclients import ScramClient
from e2e import (  # noqa: F401 (mailgate_server is a fixture)
    DEADLINE,
    LineReader,
    connect,
    mailgate_cli,
    mailgate_server,
    retrieve,
    runCommand,
    sqliteOnly,
    waitFor,
)
from sharedserver import shared, sharedBackend, sharedServers  # noqa: F401 (fixtures)

ALICE = "alice@example.org"
ALICE_PW = "wonder land"
SENDER = "sender@example.net"
CLIENT = "client.test"
LOOPBACK_TCP = "tcp:0:interface=127.0.0.1"
# A second loopback address: the source of an "untrusted" client when the
# server trusts only 127.0.0.1/32.
UNTRUSTED_SOURCE = "127.0.0.2"
FAST_FAILURES = ("--auth-failure-delay", "0.05")
PLAINTEXT_REFUSED = (
    b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections\r\n"
)
INVALID = b"-ERR [AUTH] invalid user name or password\r\n"


# -- certificates and client contexts --------------------------------------


@pytest.fixture(scope="module")
def moduleCertificate(tmp_path_factory):
    """
    The certificate of the module's shared servers (tests/sharedserver.py),
    made like L{certificate}.
    """
    return makeCertificate(tmp_path_factory.mktemp("tls"), "localhost", name="server")


@pytest.fixture
def certificate(tmp_path):
    """
    A self-signed certificate for "localhost" and 127.0.0.1, and its key:
    C{(certificatePath, keyPath)}.
    """
    directory = tmp_path / "tls"
    directory.mkdir()
    return makeCertificate(directory, "localhost", name="server")


def clientContext(*certificates):
    """
    A client context trusting exactly the given PEM certificates, checking
    the host name (the certificates name 127.0.0.1 as an IP address).
    """
    context = ssl.create_default_context(cadata="".join(p.read_text() for p in certificates))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    return context


def der(path):
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def tlsOptions(certificatePath, keyPath):
    return ("--tls-cert", str(certificatePath), "--tls-key", str(keyPath))


def peerCertificate(sock):
    return sock.getpeercert(binary_form=True)


# -- a POP3 session on a raw socket ------------------------------------------


class POP3Wire:
    """
    A POP3 session on a socket, which can be switched to TLS.
    """

    def __init__(self, port, source="127.0.0.1"):
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0)
        )
        self.reader = LineReader(self.sock)
        self.greeting = self.reader.line()
        assert self.greeting.startswith(b"+OK"), self.greeting

    def command(self, text):
        self.sock.sendall(text.encode("utf-8") + b"\r\n")
        return self.reader.line()

    def capabilities(self):
        status = self.command("CAPA")
        assert status.startswith(b"+OK"), status
        return self.reader.multiline().decode("ascii").split("\r\n")[:-2]

    def stls(self, context, hostname="127.0.0.1"):
        reply = self.command("STLS")
        assert reply.startswith(b"+OK"), reply
        assert self.reader.buffer == b""
        self.sock = context.wrap_socket(self.sock, server_hostname=hostname)
        self.reader = LineReader(self.sock)

    def close(self):
        self.sock.close()


def assertClientRefuses(port, context):
    """
    STLS with a client that does not trust the server's certificate fails
    on the client's side, in the handshake.
    """
    wire = POP3Wire(port)
    with pytest.raises(ssl.SSLCertVerificationError):
        wire.stls(context)
    wire.close()  # the plain socket, detached by the failed wrap


def sasl(wire, mechanism, initial):
    """
    Start AUTH with an initial response; return the server's reply line.
    """
    return wire.command(f"AUTH {mechanism} {base64.b64encode(initial).decode('ascii')}")


def challengeOf(reply):
    assert reply.startswith(b"+ ") and reply.endswith(b"\r\n"), reply
    return base64.b64decode(reply[2:-2], validate=True)


def scram(wire, username, password):
    """
    Run AUTH SCRAM-SHA-256 to the end; return the final reply line (after
    checking the server's signature when it sends one).
    """
    client = ScramClient(username, password)
    serverFirst = challengeOf(sasl(wire, "SCRAM-SHA-256", client.first()))
    reply = wire.command(base64.b64encode(client.final(serverFirst)).decode("ascii"))
    if reply.startswith(b"+ "):
        assert client.verify(challengeOf(reply)), "the server's SCRAM signature is wrong"
        reply = wire.command("")
    return reply


# -- helpers -------------------------------------------------------------------


def message(subject):
    return (
        f"From: <{SENDER}>\r\nTo: <{ALICE}>\r\nSubject: {subject}\r\n\r\n"
        f"body of {subject}\r\n.dot line\r\n"
    ).encode()


def receivedOf(stored):
    """
    The Received field (continuation lines included) of a stored message.
    """
    match = re.search(rb"^Received: .*?(?=\r\n[^\t ])", stored, re.S | re.M)
    assert match, stored[:400]
    return match.group(0).decode("utf-8")


def logLines(server, text):
    return [line for line in server.stdout.splitlines() if text in line]


def sharedAliceOverTLS(shared, certificate):
    """
    The module's server as L{serveAliceOverTLS} starts one (no user on it
    has APOP), the admin command on its database, and a maildrop of the
    test's own: C{(server, cli, address)}.
    """
    certificatePath, keyPath = certificate
    server = shared(
        *tlsOptions(certificatePath, keyPath),
        "--pop3s", LOOPBACK_TCP,
        "--smtp", LOOPBACK_TCP,
        "--domain", "example.org",
    )
    cli = shared.cli(server)
    alice = shared.address("alice")
    cli.addUser(alice, ALICE_PW)
    return server, cli, alice


def serveAliceOverTLS(mailgate_server, mailgate_cli, certificate):
    """
    A server with Alice's maildrop, the certificate, POP3 (STLS), POP3S
    and SMTP (STARTTLS).
    """
    certificatePath, keyPath = certificate
    mailgate_cli.addUser(ALICE, ALICE_PW)
    return mailgate_server(
        *tlsOptions(certificatePath, keyPath),
        "--pop3s", LOOPBACK_TCP,
        "--smtp", LOOPBACK_TCP,
        "--domain", "example.org",
    )


# -- 1. STLS, implicit TLS and STARTTLS ------------------------------------------


def test_stlsPop3sAndStarttls(shared, moduleCertificate, tmp_path):
    """
    Clients verifying the certificate switch to TLS with STARTTLS (SMTP)
    and STLS (POP3) or use implicit TLS (--pop3s); mail sent over TLS says
    so in its Received field.  STLS is refused once logged in or once TLS
    is on.
    """
    certificatePath, _ = moduleCertificate
    context = clientContext(certificatePath)
    server, mailgate_cli, alice = sharedAliceOverTLS(shared, moduleCertificate)

    smtp = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), local_hostname=CLIENT, timeout=DEADLINE)
    smtp.ehlo()
    assert smtp.has_extn("starttls"), smtp.esmtp_features
    code, text = smtp.starttls(context=context)
    assert code == 220, text
    assert peerCertificate(smtp.sock) == der(certificatePath)
    smtp.ehlo()
    assert not smtp.has_extn("starttls"), smtp.esmtp_features
    sent = message("over STARTTLS")
    assert smtp.sendmail(SENDER, [alice], sent) == {}
    assert smtp.quit()[0] == 221

    # STLS with poplib.
    pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    assert "STLS" in pop.capa()
    assert pop.stls(context).startswith(b"+OK")
    assert peerCertificate(pop.sock) == der(certificatePath)
    assert "STLS" not in pop.capa()
    with pytest.raises(poplib.error_proto) as refused:
        pop._shortcmd("STLS")
    assert refused.value.args[0].startswith(b"-ERR"), refused.value
    pop.user(alice)
    assert pop.pass_(ALICE_PW).startswith(b"+OK")
    assert pop.stat()[0] == 1
    stored = retrieve(pop, 1)
    assert stored.endswith(sent)
    received = receivedOf(stored)
    assert re.search(r"\bwith ESMTPS id ", received), received
    assert pop.quit().startswith(b"+OK")

    # Implicit TLS.
    pops = poplib.POP3_SSL("127.0.0.1", server.portOf("POP3S"), context=context, timeout=DEADLINE)
    assert peerCertificate(pops.sock) == der(certificatePath)
    assert "STLS" not in pops.capa()
    pops.user(alice)
    assert pops.pass_(ALICE_PW).startswith(b"+OK")
    assert retrieve(pops, 1) == stored
    assert pops.quit().startswith(b"+OK")

    # STLS after a login in clear (allowed from 127.0.0.1) is refused, and
    # the session goes on.
    pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    pop.user(alice)
    pop.pass_(ALICE_PW)
    with pytest.raises(poplib.error_proto) as refused:
        pop._shortcmd("STLS")
    assert refused.value.args[0].startswith(b"-ERR"), refused.value
    assert pop.stat()[0] == 1
    assert pop.quit().startswith(b"+OK")

    # The clients really verify: one trusting another certificate fails.
    other, _ = makeCertificate(tmp_path, "localhost", name="other")
    assertClientRefuses(server.port, clientContext(other))


def test_pop3sStreamsALargeMessageAndDropsWhatIsNotTLS(mailgate_server, mailgate_cli, certificate):
    """
    A message of several MB goes in over STARTTLS (the DATA reader paced
    by the spool) and comes out over implicit TLS (streamed, paced by the
    client's reading) octet for octet, dot-stuffed lines included.
    A client speaking plain POP3 to the TLS port gets no POP3 answer: the
    handshake fails, the connection is closed, the server logs why and
    goes on serving.
    """
    certificatePath, _ = certificate
    context = clientContext(certificatePath)
    server = serveAliceOverTLS(mailgate_server, mailgate_cli, certificate)
    lines = b"".join(b"%s line %06d of a long message\r\n" % (b"." if i % 7 == 0 else b"", i) for i in range(100000))
    big = message("large") + lines
    assert len(big) > 3_000_000
    smtp = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), local_hostname=CLIENT, timeout=DEADLINE)
    assert smtp.starttls(context=context)[0] == 220
    smtp.ehlo()
    assert smtp.sendmail(SENDER, [ALICE], big) == {}
    smtp.quit()

    plain = socket.create_connection(("127.0.0.1", server.portOf("POP3S")), timeout=DEADLINE)
    plain.sendall(b"USER " + ALICE.encode() + b"\r\n")
    answered = b""
    try:
        while len(answered) < 65536:
            chunk = plain.recv(4096)
            if not chunk:
                break
            answered += chunk
    except ConnectionResetError:
        pass
    plain.close()
    assert b"+OK" not in answered and b"-ERR" not in answered, answered
    failed = re.compile(r"pop3 TLS failed peer=127\.0\.0\.1:\d+ reason=WRONG_VERSION_NUMBER$")
    waitFor(
        lambda: [line for line in logLines(server, "pop3 TLS failed") if failed.search(line)],
        "the failed handshake in the log",
    )

    pops = poplib.POP3_SSL("127.0.0.1", server.portOf("POP3S"), context=context, timeout=DEADLINE)
    pops.user(ALICE)
    assert pops.pass_(ALICE_PW).startswith(b"+OK")
    stored = retrieve(pops, 1)
    assert stored.endswith(big)
    assert pops.quit().startswith(b"+OK")


def test_aFailedSTARTTLSHandshakeEndsWithTLSFailedNotTLSYes(mailgate_server, mailgate_cli, certificate):
    """
    An MTA whose STARTTLS handshake fails (here: it sends plain text after
    the 220) has its session's end line say so, every time: the
    session.tls_failed line comes once a minute per address, and the end
    line said reason='connection lost' tls=yes, a TLS session that went
    away.
    """
    server = serveAliceOverTLS(mailgate_server, mailgate_cli, certificate)
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", server.portOf("SMTP")), timeout=DEADLINE)
        reader = LineReader(sock)
        assert reader.line().startswith(b"220 ")
        sock.sendall(b"EHLO mx.example.test\r\n")
        while not reader.line().startswith(b"250 "):
            pass
        sock.sendall(b"STARTTLS\r\n")
        assert reader.line().startswith(b"220 ")
        sock.sendall(b"MAIL FROM:<sender@example.net>\r\n")
        # Not TLS: no answer, the connection closed.
        assert sock.recv(4096) == b""
        sock.close()
    ends = waitFor(
        lambda: (lambda found: found if len(found) == 2 else None)(logLines(server, "smtp disconnect")),
        "both sessions' end lines",
    )
    assert all(" reason='TLS failed' " in line and " tls=no " in line for line in ends), ends
    assert len(logLines(server, "smtp TLS failed")) == 1


def test_aPOP3SClientResumesItsTLSSession(shared, moduleCertificate):
    """
    A client that keeps its TLS session resumes it on its next connection
    (no certificate signature for the server to make), again and again:
    each connection's ticket serves the next.  The resumed sessions are
    POP3 sessions like any other.
    """
    certificatePath, _ = moduleCertificate
    context = clientContext(certificatePath)
    server, _, alice = sharedAliceOverTLS(shared, moduleCertificate)
    session = None
    reused = []
    for _ in range(4):
        raw = socket.create_connection(("127.0.0.1", server.portOf("POP3S")), timeout=DEADLINE)
        sock = context.wrap_socket(raw, server_hostname="127.0.0.1", session=session)
        reader = LineReader(sock)
        assert reader.line().startswith(b"+OK")
        sock.sendall(f"USER {alice}\r\nPASS {ALICE_PW}\r\nSTAT\r\nQUIT\r\n".encode())
        replies = [reader.line() for _ in range(4)]
        assert all(reply.startswith(b"+OK") for reply in replies), replies
        assert replies[2] == b"+OK 0 0\r\n"
        reused.append(sock.session_reused)
        assert peerCertificate(sock) == der(certificatePath)
        session = sock.session
        assert session.has_ticket
        sock.close()
    assert reused == [False, True, True, True]


@sqliteOnly  # TLS does not depend on the database
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_aTicketIsRefusedOnceTheServerHasRenewedItsKey(mailgate_server, mailgate_cli, certificate, version):
    """
    --tls-ticket-key-rotation 1: the server seals tickets with a new key
    every second, and a client that comes back with the ticket of a key
    since replaced gets a full handshake (the certificate again) and its
    POP3 session, as any other.  A ticket of a key never renewed would
    resume for two hours.
    """
    certificatePath, keyPath = certificate
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server(
        *tlsOptions(certificatePath, keyPath), "--pop3s", LOOPBACK_TCP, "--tls-ticket-key-rotation", "1"
    )
    context = clientContext(certificatePath)
    context.minimum_version = context.maximum_version = version

    def session(resuming=None):
        raw = socket.create_connection(("127.0.0.1", server.portOf("POP3S")), timeout=DEADLINE)
        with context.wrap_socket(raw, server_hostname="127.0.0.1", session=resuming) as sock:
            reader = LineReader(sock)
            assert reader.line().startswith(b"+OK")
            sock.sendall(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\nSTAT\r\nQUIT\r\n".encode())
            replies = [reader.line() for _ in range(4)]
            assert replies[2] == b"+OK 0 0\r\n", replies
            assert sock.version() == ("TLSv1.3" if version == ssl.TLSVersion.TLSv1_3 else "TLSv1.2")
            assert peerCertificate(sock) == der(certificatePath)
            assert sock.session.has_ticket
            return sock.session_reused, sock.session

    reused, old = session()
    assert not reused
    waitFor(lambda: not session(old)[0], "a client resuming with the ticket of a renewed key to get a full handshake")


def _tlsOverSocket(context, sock):
    """
    A TLS client on memory BIOs over a real socket: what C{SSLSocket}
    cannot do, send its close_notify and read on.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")

    def flush():
        if outgoing.pending:
            sock.sendall(outgoing.read())

    def receive():
        data = sock.recv(65536)
        if data:
            incoming.write(data)
        else:
            incoming.write_eof()
        return data

    for _ in range(100):
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            flush()
            assert receive(), "the server closed during the handshake"
    flush()
    return tls, flush, receive


def test_aPOP3SClientThatSendsCloseNotifyGetsEveryReply(shared, moduleCertificate):
    """
    A POP3S client sends its commands and then its close_notify (TLS 1.3
    lets it read on): it gets every reply, the deletion its QUIT asked
    for is applied, and the server ends with its own close_notify.
    """
    certificatePath, _ = moduleCertificate
    server, mailgate_cli, alice = sharedAliceOverTLS(shared, moduleCertificate)
    mailgate_cli.deliver(alice, message("to be deleted"))
    raw = socket.create_connection(("127.0.0.1", server.portOf("POP3S")), timeout=DEADLINE)
    with raw:
        tls, flush, receive = _tlsOverSocket(clientContext(certificatePath), raw)
        tls.write(f"USER {alice}\r\nPASS {ALICE_PW}\r\nSTAT\r\nDELE 1\r\nQUIT\r\n".encode())
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        flush()
        answer = b""
        closeNotify = False
        for _ in range(1000):
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                if not receive():
                    break
            except ssl.SSLZeroReturnError:
                closeNotify = True
                break
    lines = answer.decode().splitlines()
    assert [line.split(" ")[0] for line in lines] == ["+OK"] * 6, answer
    assert lines[3].startswith("+OK 1 "), answer
    assert closeNotify
    assert mailgate_cli.mailbox(alice) == []


def test_tlsMinVersion13RefusesATLS12Client(mailgate_server, mailgate_cli, certificate):
    """
    twistd mailgate --tls-min-version 1.3: a client that speaks at most
    TLS 1.2 gets a protocol-version alert on the POP3S port; a TLS 1.3
    client logs in.
    """
    certificatePath, keyPath = certificate
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server(*tlsOptions(certificatePath, keyPath), "--pop3s", LOOPBACK_TCP, "--tls-min-version", "1.3")
    old = clientContext(certificatePath)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", server.portOf("POP3S")), timeout=DEADLINE) as raw:
        with pytest.raises(ssl.SSLError, match="(?i)protocol version|unsupported protocol"):
            old.wrap_socket(raw, server_hostname="127.0.0.1")
    raw = socket.create_connection(("127.0.0.1", server.portOf("POP3S")), timeout=DEADLINE)
    with clientContext(certificatePath).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert sock.version() == "TLSv1.3"
        reader = LineReader(sock)
        assert reader.line().startswith(b"+OK")
        sock.sendall(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\nQUIT\r\n".encode())
        assert [reader.line()[:3] for _ in range(3)] == [b"+OK"] * 3


def jsonRecords(server, event):
    """
    The JSON log records of C{event} the server wrote so far.
    """
    records = (json.loads(line) for line in server.stdout.splitlines() if line.startswith("{"))
    return [record for record in records if record.get("event") == event]


@sqliteOnly  # TLS does not depend on the database
def test_theTLSVersionAndCipherOfEachSessionAreLoggedAndCounted(mailgate_server, mailgate_cli, certificate):
    """
    Before raising --tls-min-version, an administrator looks up who still
    negotiates TLS 1.2: each TLS session's end line (pop3.logout over
    POP3S and after STLS, smtp.disconnect and lmtp.disconnect after
    STARTTLS) names the version and cipher the client negotiated, in the
    text and as JSON fields, and mailgate_tls_sessions_total{protocol,
    version} counts them, every series at zero from the start.  Before,
    neither said which version a client used.
    """
    from test_metrics import promtoolCheck, sample, scrape

    certificatePath, keyPath = certificate
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server(
        *tlsOptions(certificatePath, keyPath),
        "--pop3s", LOOPBACK_TCP, "--smtp", LOOPBACK_TCP, "--lmtp", LOOPBACK_TCP,
        "--domain", "example.org", "--metrics", LOOPBACK_TCP, "--log-format", "json",
    )
    versions = ("TLSv1.2", "TLSv1.3")
    protocols = ("pop3", "smtp", "lmtp")

    def counted():
        _, text = scrape(server)
        promtoolCheck(text)
        return {
            (p, v): sample(text, "mailgate_tls_sessions_total", protocol=p, version=v)
            for p in protocols for v in versions
        }

    assert counted() == dict.fromkeys(((p, v) for p in protocols for v in versions), 0)
    tls12 = clientContext(certificatePath)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    tls13 = clientContext(certificatePath)
    tls13.minimum_version = ssl.TLSVersion.TLSv1_3
    negotiated = {}

    # POP3S at TLS 1.2, STLS at TLS 1.3, and a session in the clear.
    pops = poplib.POP3_SSL("127.0.0.1", server.portOf("POP3S"), context=tls12, timeout=DEADLINE)
    negotiated["pops"] = (pops.sock.version(), pops.sock.cipher()[0])
    pops.user(ALICE)
    pops.pass_(ALICE_PW)
    assert pops.quit().startswith(b"+OK")
    pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    pop.stls(tls13)
    negotiated["stls"] = (pop.sock.version(), pop.sock.cipher()[0])
    pop.user(ALICE)
    pop.pass_(ALICE_PW)
    assert pop.quit().startswith(b"+OK")
    pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    pop.user(ALICE)
    pop.pass_(ALICE_PW)
    assert pop.quit().startswith(b"+OK")

    # SMTP STARTTLS at TLS 1.2, LMTP STARTTLS at TLS 1.3.
    smtp = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), local_hostname=CLIENT, timeout=DEADLINE)
    assert smtp.starttls(context=tls12)[0] == 220
    negotiated["smtp"] = (smtp.sock.version(), smtp.sock.cipher()[0])
    assert smtp.sendmail(SENDER, [ALICE], message("over TLS 1.2")) == {}
    smtp.quit()
    lmtp = smtplib.LMTP("127.0.0.1", server.portOf("LMTP"), local_hostname=CLIENT, timeout=DEADLINE)
    lmtp.ehlo_or_helo_if_needed()
    assert lmtp.starttls(context=tls13)[0] == 220
    negotiated["lmtp"] = (lmtp.sock.version(), lmtp.sock.cipher()[0])
    lmtp.quit()

    assert [negotiated[k][0] for k in ("pops", "stls", "smtp", "lmtp")] == ["TLSv1.2", "TLSv1.3", "TLSv1.2", "TLSv1.3"]
    logouts = waitFor(
        lambda: (lambda found: found if len(found) == 3 else None)(jsonRecords(server, "pop3.logout")),
        "the three POP3 sessions' logout lines",
    )
    ends = {
        name: waitFor(lambda name=name: jsonRecords(server, f"{name}.disconnect"), f"the {name} end line")
        for name in ("smtp", "lmtp")
    }
    seen = {"pops": logouts[0], "stls": logouts[1], "smtp": ends["smtp"][0], "lmtp": ends["lmtp"][0]}
    for key, record in seen.items():
        version, cipher = negotiated[key]
        assert (record["tlsVersion"], record["tlsCipher"]) == (version, cipher), record
        assert f" tls_version={version} tls_cipher={cipher}" in record["text"], record
    assert " tls=yes tls_version=TLSv1.2 " in ends["smtp"][0]["text"]
    assert "tlsVersion" not in logouts[2] and "tls_" not in logouts[2]["text"], logouts[2]
    assert counted() == {
        ("pop3", "TLSv1.2"): 1, ("pop3", "TLSv1.3"): 1,
        ("smtp", "TLSv1.2"): 1, ("smtp", "TLSv1.3"): 0,
        ("lmtp", "TLSv1.2"): 0, ("lmtp", "TLSv1.3"): 1,
    }


@sqliteOnly  # TLS does not depend on the database
def test_tlsCiphersIsWhatATLS12ClientGetsAndOneThatCannotWorkStopsTheStart(mailgate_server, mailgate_cli, certificate):
    """
    twistd mailgate --tls-ciphers ECDHE+AESGCM (AEAD only): a TLS 1.2
    client offering only CBC suites gets a handshake failure on the POP3S
    port, one offering AES-GCM logs in.  A list of RSA suites only, with
    this ECDSA certificate, stops the start: one line, exit 78.
    """
    certificatePath, keyPath = certificate
    mailgate_cli.addUser(ALICE, ALICE_PW)
    refused = mailgate_server.spawn(
        *tlsOptions(certificatePath, keyPath), "--pop3s", LOOPBACK_TCP, "--tls-ciphers", "ECDHE-RSA-AES128-GCM-SHA256",
        listen=False,
    )
    assert refused.wait() == 78, refused.log()
    errors = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "no TLS 1.2 suite of it works with the certificate's ECDSA key" in errors[0], errors
    server = mailgate_server(*tlsOptions(certificatePath, keyPath), "--pop3s", LOOPBACK_TCP, "--tls-ciphers", "ECDHE+AESGCM")
    cbc = clientContext(certificatePath)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA")
    with socket.create_connection(("127.0.0.1", server.portOf("POP3S")), timeout=DEADLINE) as raw:
        with pytest.raises(ssl.SSLError, match="(?i)handshake failure|no shared cipher"):
            cbc.wrap_socket(raw, server_hostname="127.0.0.1")
    aead = clientContext(certificatePath)
    aead.maximum_version = ssl.TLSVersion.TLSv1_2
    aead.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256")
    raw = socket.create_connection(("127.0.0.1", server.portOf("POP3S")), timeout=DEADLINE)
    with aead.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert sock.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
        reader = LineReader(sock)
        assert reader.line().startswith(b"+OK")
        sock.sendall(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\nQUIT\r\n".encode())
        assert [reader.line()[:3] for _ in range(3)] == [b"+OK"] * 3


# -- 2. curl ---------------------------------------------------------------------

CURL = shutil.which("curl")


@pytest.mark.skipif(CURL is None, reason="curl is not installed (no curl on PATH)")
def test_curlOverTLS(shared, moduleCertificate):
    """
    curl, requiring TLS and trusting the certificate, fetches a message
    with STLS (pop3://) and with implicit TLS (pop3s://).
    """
    certificatePath, _ = moduleCertificate
    # The module's server of STLS and implicit TLS, SMTP too.
    server, mailgate_cli, alice = sharedAliceOverTLS(shared, moduleCertificate)
    sent = message("for curl")
    mailgate_cli.deliver(alice, sent)
    base = [CURL, "-s", "-S", "--max-time", "15", "--cacert", str(certificatePath), "-u", f"{alice}:{ALICE_PW}"]
    for url in (
        f"pop3://127.0.0.1:{server.port}/1",
        f"pop3s://127.0.0.1:{server.portOf('POP3S')}/1",
    ):
        code, out, err = runCommand(base + ["--ssl-reqd", url])
        assert code == 0, (url, code, err)
        assert out.encode() == sent, url
    # Without the certificate to trust, curl refuses the server.
    code, out, err = runCommand([CURL, "-s", "-S", "--max-time", "15", "--ssl-reqd",
                                 "-u", f"{alice}:{ALICE_PW}", f"pop3://127.0.0.1:{server.port}/1"])
    assert code == 60, (code, err)  # CURLE_PEER_FAILED_VERIFICATION


def test_anECDSACertificateBesideTheRSAOne(mailgate_server, mailgate_cli, tmp_path):
    """
    With --tls-alt-cert/--tls-alt-key, clients that check ECDSA signatures
    (Python's default client here, over TLS 1.3) get the ECDSA
    certificate, over POP3S and STLS alike, and a TLS 1.2 client offering
    only RSA suites still gets the RSA one; both read their mail.
    """
    directory = tmp_path / "tls"
    directory.mkdir()
    rsaCertificate, rsaKey = makeCertificate(directory, "localhost", name="rsa", keyType="rsa")
    ecCertificate, ecKey = makeCertificate(directory, "localhost", name="ecdsa")
    mailgate_cli.addUser(ALICE, ALICE_PW)
    sent = message("for both kinds of client")
    mailgate_cli.deliver(ALICE, sent)
    server = mailgate_server(
        *tlsOptions(rsaCertificate, rsaKey),
        "--tls-alt-cert", str(ecCertificate), "--tls-alt-key", str(ecKey),
        "--pop3s", LOOPBACK_TCP,
    )
    modern = clientContext(rsaCertificate, ecCertificate)
    rsaOnly = clientContext(rsaCertificate, ecCertificate)
    rsaOnly.maximum_version = ssl.TLSVersion.TLSv1_2
    rsaOnly.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384")

    for context, expected, version in ((modern, ecCertificate, "TLSv1.3"), (rsaOnly, rsaCertificate, "TLSv1.2")):
        pops = poplib.POP3_SSL("127.0.0.1", server.portOf("POP3S"), context=context, timeout=DEADLINE)
        pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
        assert pop.stls(context).startswith(b"+OK")
        for session in (pops, pop):
            assert peerCertificate(session.sock) == der(expected)
            assert session.sock.version() == version
            session.user(ALICE)
            assert session.pass_(ALICE_PW).startswith(b"+OK")
            assert retrieve(session, 1).endswith(sent)
            assert session.quit().startswith(b"+OK")
    assert server.running(), server.log()


def test_eachDomainsHostNameGetsItsOwnCertificate(mailgate_server, mailgate_cli, tmp_path):
    """
    A gateway for several domains (--tls-sni-cert): a client that asks
    for mail.example.net, or any name under example.com, gets that
    domain's certificate and checks it, over POP3S and STLS alike; a
    client asking for another name gets the main one; all read their mail.
    """
    directory = tmp_path / "tls"
    directory.mkdir()
    main = makeCertificate(directory, "localhost", name="main")
    net = makeCertificate(directory, "mail.example.net", name="net", keyType="rsa")
    com = makeCertificate(directory, "*.example.com", name="com")
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server(
        *tlsOptions(*main),
        "--tls-sni-cert", f"{net[0]}:{net[1]}", "--tls-sni-cert", f"{com[0]}:{com[1]}",
        "--pop3s", LOOPBACK_TCP,
    )
    for hostname, pair in (("mail.example.net", net), ("pop.example.com", com), ("localhost", main)):
        context = clientContext(pair[0])
        implicit = socket.create_connection(("127.0.0.1", server.portOf("POP3S")), timeout=DEADLINE)
        implicit = context.wrap_socket(implicit, server_hostname=hostname)
        wire = POP3Wire(server.port)
        wire.stls(context, hostname)
        for sock in (implicit, wire.sock):
            assert peerCertificate(sock) == der(pair[0]), hostname
            reader = LineReader(sock)
            if sock is implicit:
                assert reader.line().startswith(b"+OK")
            for line, reply in ((f"USER {ALICE}", b"+OK"), (f"PASS {ALICE_PW}", b"+OK"), ("QUIT", b"+OK")):
                sock.sendall(line.encode() + b"\r\n")
                assert reader.line().startswith(reply), (hostname, line)
            sock.close()
    assert server.running(), server.log()


# -- 3. the plaintext policy -------------------------------------------------------


def test_untrustedClientNeedsTLSForPlaintextPasswords(shared, moduleCertificate):
    """
    With --trusted-network 127.0.0.1/32, a client from 127.0.0.2 is offered
    neither USER nor PLAIN and is refused USER/PASS in clear; after STLS it
    logs in with USER/PASS.  A client from 127.0.0.1 is trusted.
    """
    certificatePath, keyPath = moduleCertificate
    server = shared(*tlsOptions(certificatePath, keyPath), "--trusted-network", "127.0.0.1/32", *FAST_FAILURES)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    mailgate_cli.addUser(alice, ALICE_PW)

    trusted = POP3Wire(server.port)
    capabilities = trusted.capabilities()
    assert "USER" in capabilities and "STLS" in capabilities, capabilities
    assert "SASL SCRAM-SHA-256 PLAIN LOGIN" in capabilities, capabilities
    trusted.close()

    wire = POP3Wire(server.port, source=UNTRUSTED_SOURCE)
    capabilities = wire.capabilities()
    assert "STLS" in capabilities, capabilities
    assert "USER" not in capabilities, capabilities
    [saslLine] = [line for line in capabilities if line.startswith("SASL")]
    assert "PLAIN" not in saslLine.split() and "LOGIN" not in saslLine.split(), capabilities
    assert wire.command(f"USER {alice}") == PLAINTEXT_REFUSED
    assert wire.command(f"PASS {ALICE_PW}") == PLAINTEXT_REFUSED
    assert sasl(wire, "PLAIN", f"\0{alice}\0{ALICE_PW}".encode()) == PLAINTEXT_REFUSED
    # Still in AUTHORIZATION: a transaction command is refused.
    assert wire.command("STAT").startswith(b"-ERR")

    wire.stls(clientContext(certificatePath))
    assert peerCertificate(wire.sock) == der(certificatePath)
    capabilities = wire.capabilities()
    assert "USER" in capabilities and "STLS" not in capabilities, capabilities
    assert "SASL SCRAM-SHA-256 PLAIN LOGIN" in capabilities, capabilities
    assert wire.command(f"USER {alice}").startswith(b"+OK")
    assert wire.command(f"PASS {ALICE_PW}").startswith(b"+OK")
    assert wire.command("STAT") == b"+OK 0 0\r\n"
    assert wire.command("QUIT").startswith(b"+OK")
    assert wire.reader.closed()
    wire.close()


def test_trustedNetworkNoneAsksTLSOfLoopbackToo(mailgate_server, mailgate_cli, certificate):
    """
    With --trusted-network none, plaintext passwords need TLS from every
    network, loopback included: a client on 127.0.0.1 is offered neither
    USER nor PLAIN, is refused them in clear, and logs in after STLS.
    """
    certificatePath, keyPath = certificate
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server(*tlsOptions(certificatePath, keyPath), "--trusted-network", "none", *FAST_FAILURES)

    wire = POP3Wire(server.port)
    capabilities = wire.capabilities()
    assert "STLS" in capabilities and "USER" not in capabilities, capabilities
    assert "SASL SCRAM-SHA-256" in capabilities, capabilities
    assert wire.command(f"USER {ALICE}") == PLAINTEXT_REFUSED
    assert sasl(wire, "PLAIN", f"\0{ALICE}\0{ALICE_PW}".encode()) == PLAINTEXT_REFUSED
    wire.stls(clientContext(certificatePath))
    assert wire.command(f"USER {ALICE}").startswith(b"+OK")
    assert wire.command(f"PASS {ALICE_PW}").startswith(b"+OK")
    assert wire.command("QUIT").startswith(b"+OK")
    wire.close()


# -- 4. AUTH PLAIN and SCRAM-SHA-256 -------------------------------------------------


def test_authPlainAndScramOverRealSockets(shared, moduleCertificate):
    """
    AUTH PLAIN (from a trusted address in clear, and from an untrusted one
    over TLS) and SCRAM-SHA-256 (in clear even from an untrusted address:
    the password never crosses the wire) log in with the right password
    and fail with a wrong one or an unknown user.
    """
    certificatePath, keyPath = moduleCertificate
    context = clientContext(certificatePath)
    server = shared(*tlsOptions(certificatePath, keyPath), "--trusted-network", "127.0.0.1/32", *FAST_FAILURES)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    mailgate_cli.addUser(alice, ALICE_PW)
    mailgate_cli.deliver(alice, message("sasl"))

    def plainFrom(source, password, tls=False, user=alice):
        wire = POP3Wire(server.port, source=source)
        if tls:
            wire.stls(context)
        reply = sasl(wire, "PLAIN", f"\0{user}\0{password}".encode())
        if reply.startswith(b"+OK"):
            assert wire.command("STAT").startswith(b"+OK 1 ")
            assert wire.command("QUIT").startswith(b"+OK")
        wire.close()
        return reply

    assert plainFrom("127.0.0.1", ALICE_PW).startswith(f"+OK {alice} has 1 messages".encode())
    assert plainFrom("127.0.0.1", "wrong") == INVALID
    assert plainFrom(UNTRUSTED_SOURCE, ALICE_PW, tls=True).startswith(b"+OK")
    assert plainFrom(UNTRUSTED_SOURCE, "wrong", tls=True) == INVALID
    assert plainFrom(UNTRUSTED_SOURCE, ALICE_PW, user="nobody@example.org", tls=True) == INVALID

    def scramFrom(source, password, tls=False, user=alice):
        wire = POP3Wire(server.port, source=source)
        if tls:
            wire.stls(context)
        reply = scram(wire, user, password)
        if reply.startswith(b"+OK"):
            assert wire.command("STAT").startswith(b"+OK 1 ")
            assert wire.command("QUIT").startswith(b"+OK")
        wire.close()
        return reply

    assert scramFrom(UNTRUSTED_SOURCE, ALICE_PW).startswith(f"+OK {alice} has 1 messages".encode())
    assert scramFrom(UNTRUSTED_SOURCE, "wrong") == INVALID
    assert scramFrom(UNTRUSTED_SOURCE, ALICE_PW, user="nobody@example.org") == INVALID
    assert scramFrom("127.0.0.1", ALICE_PW, tls=True).startswith(b"+OK")

    # A failed attempt leaves the session usable: log in after it.
    wire = POP3Wire(server.port, source=UNTRUSTED_SOURCE)
    assert scram(wire, alice, "wrong") == INVALID
    assert scram(wire, alice, ALICE_PW).startswith(b"+OK")
    assert wire.command("QUIT").startswith(b"+OK")
    wire.close()
    # Nothing was deleted by any of this.
    assert len(mailgate_cli.mailbox(alice)) == 1


# -- 5. replacing the certificate at run time ----------------------------------------


def test_certificateReloadOnSIGHUP(mailgate_server, mailgate_cli, tmp_path):
    """
    SIGHUP makes a replaced certificate take effect for new connections,
    STLS and implicit TLS alike, while an established session carries on
    with the old one.  An unusable replacement (garbage, or a certificate
    with another's key) is logged and the certificate in service stays.
    """
    live = tmp_path / "live"
    live.mkdir()
    certificatePath, keyPath = makeCertificate(live, "localhost", name="server")
    # Keep copies of A to trust and to put back; make B elsewhere.
    saved = tmp_path / "a"
    saved.mkdir()
    certA = saved / "server.crt"
    keyA = saved / "server.key"
    shutil.copyfile(certificatePath, certA)
    shutil.copyfile(keyPath, keyA)
    (tmp_path / "b").mkdir()
    certB, keyB = makeCertificate(tmp_path / "b", "localhost", name="server")
    assert der(certA) != der(certB)
    trustA, trustB = clientContext(certA), clientContext(certB)

    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.deliver(ALICE, message("reload"))
    server = mailgate_server(*tlsOptions(certificatePath, keyPath), "--pop3s", LOOPBACK_TCP)

    def presented(context):
        """
        The certificates a new STLS and a new implicit-TLS connection get.
        """
        pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
        pop.stls(context)
        stls = peerCertificate(pop.sock)
        pop.quit()
        pops = poplib.POP3_SSL("127.0.0.1", server.portOf("POP3S"), context=context, timeout=DEADLINE)
        implicit = peerCertificate(pops.sock)
        pops.quit()
        return stls, implicit

    def sighup(logText, count):
        os.kill(server.process.pid, signal.SIGHUP)
        return waitFor(
            lambda: len(logLines(server, logText)) >= count and logLines(server, logText),
            f"{count} log line(s) with {logText!r}",
        )

    # A session established with certificate A.
    old = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    old.stls(trustA)
    old.user(ALICE)
    assert old.pass_(ALICE_PW).startswith(b"+OK")
    assert old.stat()[0] == 1
    assert presented(trustA) == (der(certA), der(certA))

    # Garbage in both files: refused, A stays.
    certificatePath.write_bytes(b"this is not a certificate\n")
    keyPath.write_bytes(b"nor is this a key\n")
    [failure] = sighup("TLS reload failed", 1)
    assert "keeping the previous certificate" in failure, failure
    assert presented(trustA) == (der(certA), der(certA))

    # Certificate B with A's key: they do not belong together; A stays.
    shutil.copyfile(certB, certificatePath)
    shutil.copyfile(keyA, keyPath)
    failures = sighup("TLS reload failed", 2)
    assert "keeping the previous certificate" in failures[1], failures
    assert presented(trustA) == (der(certA), der(certA))
    assert not logLines(server, "TLS certificate reloaded")

    # B with its own key: new connections get B.
    shutil.copyfile(keyB, keyPath)
    [reloaded] = sighup("TLS certificate reloaded", 1)
    assert certificateFingerprint(certB) in reloaded, reloaded
    assert presented(trustB) == (der(certB), der(certB))
    assertClientRefuses(server.port, trustA)

    # The session from before every reload carries on, still on A.
    assert peerCertificate(old.sock) == der(certA)
    assert old.stat()[0] == 1
    assert retrieve(old, 1).endswith(message("reload"))
    assert old.quit().startswith(b"+OK")
    assert server.running(), server.log()


@sqliteOnly
def test_connectionsThatHaveNotLoggedInDoNotHoldUpAStop(mailgate_server, mailgate_cli, certificate):
    """
    On SIGTERM, a POP3S connection still in its TLS handshake (a scanner
    that connected and sent nothing) and a POP3 client that has not logged
    in have nothing to finish: the server exits at once, not after the
    grace period (ten minutes here) or the handshake's own timeout.
    """
    certificatePath, keyPath = certificate
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server(
        *tlsOptions(certificatePath, keyPath),
        "--pop3s", LOOPBACK_TCP,
        "--shutdown-grace", "600",
    )
    scanner = connect(server.portOf("POP3S"))
    pop3 = connect(server.port)
    reader = LineReader(pop3)
    assert reader.line().startswith(b"+OK")
    pop3.sendall(f"USER {ALICE}\r\n".encode())
    assert reader.line() == b"+OK send PASS\r\n"
    # The scanner connected first: by the time USER is answered, the
    # server has accepted its connection (two turns of the reactor).

    server.process.send_signal(signal.SIGTERM)
    assert reader.line() == b"-ERR [SYS/TEMP] service temporarily unavailable: server shutting down; try again later\r\n"
    assert reader.closed()
    scanner.settimeout(DEADLINE)
    try:
        assert scanner.recv(1024) == b""
    except ConnectionResetError:
        pass  # aborted: as good a close for a client that sent nothing
    assert server.wait() in (0, -signal.SIGTERM), server.log()
    assert "sessions get 600.0 seconds to finish" not in server.stdout
    scanner.close()
    pop3.close()
