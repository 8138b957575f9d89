"""
End-to-end tests of the cross-protocol guard: a real C{twistd mailgate}
and a raw socket (TLS for POP3S, as a browser made to post to the port
would speak it) sending an HTTP POST whose body holds the protocol's
commands (ALPACA, 2021; the older HTTP-to-SMTP form smuggling).  The
session must end at the request line, before its body runs: no login is
tried, no message stored.  Every wait is bounded (L{e2e.DEADLINE}).
"""

import socket
import ssl

import pytest

from certs import makeCertificate
from e2e import DEADLINE, mailgate_cli, mailgate_server, sqliteOnly, waitFor  # noqa: F401 (fixtures)
from test_metrics import sample, scrape

ALICE = "alice@example.org"
ALICE_PW = "wonder land"
SENDER = "sender@remote.test"
LOOPBACK_TCP = "tcp:0:interface=127.0.0.1"


def httpPost(body, host):
    """
    What a browser sends for a form posted as text/plain to C{host}.
    """
    return (
        b"POST / HTTP/1.1\r\nHost: %s\r\nUser-Agent: Mozilla/5.0\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\n\r\n" % (host.encode(), len(body))
    ) + body


def everythingUntilClosed(sock):
    """
    What the server sends until it closes the connection (each read
    bounded by the socket's timeout: a server that reads on fails here).
    """
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            return received
        except socket.timeout:
            pytest.fail(f"the connection was not closed within {DEADLINE} s; received {received!r}")
        if not chunk:
            return received
        received += chunk


def logLines(server, text):
    return [line for line in server.stdout.splitlines() if text in line]


@sqliteOnly
def test_anHTTPPostToPOP3SEndsTheSessionBeforeItsBodyRuns(mailgate_server, mailgate_cli, tmp_path):
    """
    Over TLS to --pop3s, a POST whose body is USER and PASS (the right
    password) then LIST: one -ERR, and the connection is closed; no login
    is logged or counted, and the line logged says who and the method,
    not the body.  It was four -ERR for the HTTP lines, then +OK to USER
    and PASS: the body logged in.
    """
    directory = tmp_path / "tls"
    directory.mkdir()
    certificatePath, keyPath = makeCertificate(directory, "localhost", name="server")
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server(
        "--tls-cert", str(certificatePath), "--tls-key", str(keyPath),
        "--pop3s", LOOPBACK_TCP, "--metrics", LOOPBACK_TCP,
    )
    port = server.portOf("POP3S")
    context = ssl.create_default_context(cafile=str(certificatePath))
    body = f"USER {ALICE}\r\nPASS {ALICE_PW}\r\nLIST\r\nQUIT\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            # A browser sends at once, without waiting for a greeting.
            sock.sendall(httpPost(body, f"127.0.0.1:{port}"))
            received = everythingUntilClosed(sock)
    greeting, _, rest = received.partition(b"\r\n")
    assert greeting.startswith(b"+OK "), received
    assert rest == b"-ERR this is a POP3 server, and that line is no POP3 command; closing the connection\r\n", received
    [line] = waitFor(lambda: logLines(server, "pop3 forbidden command"), "the session.forbidden_command line")
    assert line.endswith(" why='HTTP request' verb=POST: session closed"), line
    assert " peer=127.0.0.1:" in line, line
    _, text = scrape(server)
    assert sample(text, "mailgate_forbidden_commands_total", protocol="pop3") == 1
    assert sample(text, "mailgate_logins_total", protocol="pop3", mechanism="user", result="ok") == 0
    assert sample(text, "mailgate_logins_total", protocol="pop3", mechanism="user", result="failed") == 0
    assert not logLines(server, "pop3 login") and not logLines(server, "auth.")
    assert ALICE not in server.stdout and ALICE_PW not in server.stdout


@sqliteOnly
@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_anHTTPPostToSMTPOrLMTPEndsTheSessionBeforeItsBodyRuns(mailgate_server, mailgate_cli, protocol):
    """
    To --smtp or --lmtp (an LMTP port reachable by mistake), a POST whose
    body is a whole mail transaction: 421 4.7.0 and the connection is
    closed; no message is stored.  It was a 500 for each HTTP line, then
    the body's MAIL, RCPT and DATA delivered its message to Alice.
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    option = f"--{protocol}"
    server = mailgate_server("--domain", "example.org", option, LOOPBACK_TCP, "--metrics", LOOPBACK_TCP)
    port = server.portOf(protocol.upper())
    hello = "LHLO" if protocol == "lmtp" else "EHLO"
    body = (
        f"{hello} browser.example\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n"
        "Subject: smuggled\r\n\r\nsent by a browser\r\n.\r\nQUIT\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(httpPost(body, f"127.0.0.1:{port}"))
        received = everythingUntilClosed(sock)
    greeting, _, rest = received.partition(b"\r\n")
    assert greeting.startswith(b"220 "), received
    kind = protocol.upper()
    assert rest == f"421 4.7.0 mailgate.test that line is no {kind} command, closing connection\r\n".encode(), received
    [line] = waitFor(lambda: logLines(server, f"{protocol} forbidden command"), "the session.forbidden_command line")
    assert line.endswith(" why='HTTP request' verb=POST: session closed"), line
    [end] = waitFor(lambda: logLines(server, f"{protocol} disconnect"), f"the {protocol}.disconnect line")
    assert "reason='forbidden command'" in end, end
    _, text = scrape(server)
    assert sample(text, "mailgate_forbidden_commands_total", protocol=protocol) == 1
    assert sample(text, "mailgate_deliveries_total", protocol=protocol, result="accepted") == 0
    assert mailgate_cli.mailbox(ALICE) == []
    assert "smuggled" not in server.stdout
