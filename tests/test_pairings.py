"""
The pairings README documents, with the real programs: a private Postfix
delivering into mailgate by LMTP (an unknown recipient bounced 5.1.1 by
Postfix because mailgate refused it at RCPT), and a private HAProxy in
front of a haproxy: listener, where the client's own address (not the
balancer's) is what the logs and the trusted-network policy see.

Both run on loopback only, in the test's own directories, in the
foreground, and are stopped by their pid when the test ends.
"""

import os
import poplib
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import time

import pytest

from e2e import DEADLINE, STOP_GRACE, sqliteOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from sharedserver import shared, sharedBackend, sharedServers, sqliteOnlyShared  # noqa: F401 (fixtures)

POSTFIX = shutil.which("postfix") or ("/usr/sbin/postfix" if os.path.exists("/usr/sbin/postfix") else None)
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


def freePort():
    """
    A TCP port of 127.0.0.1 nobody listens on now (for programs that must
    be told their port in a file).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def waitForPort(port, process, what):
    """
    Wait until something accepts connections on 127.0.0.1:port, failing
    early if C{process} exited.
    """

    def accepting():
        if process.poll() is not None:
            pytest.fail(f"{what} exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    waitFor(accepting, f"{what} on port {port}")


def stopProcess(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_GRACE)


# -- Postfix ---------------------------------------------------------------------------


MASTER_CF = """\
127.0.0.1:{smtpPort} inet n - n - - smtpd
pickup     unix  n - n 60 1 pickup
cleanup    unix  n - n -  0 cleanup
qmgr       unix  n - n 300 1 qmgr
rewrite    unix  - - n -  - trivial-rewrite
bounce     unix  - - n -  0 bounce
defer      unix  - - n -  0 bounce
trace      unix  - - n -  0 bounce
verify     unix  - - n -  1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -  - proxymap
proxywrite unix  - - n -  1 proxymap
smtp       unix  - - n -  - smtp
relay      unix  - - n -  - smtp
showq      unix  n - n -  - showq
error      unix  - - n -  - error
retry      unix  - - n -  - error
discard    unix  - - n -  - discard
lmtp       unix  - - n -  - lmtp
anvil      unix  - - n -  1 anvil
scache     unix  - - n -  1 scache
postlog    unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = postfix.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
smtp_dns_support_level = disabled
lmtp_host_lookup = native
# The documented pairing: mailgate's domains delivered to it by LMTP.
virtual_mailbox_domains = example.org
virtual_transport = lmtp:inet:127.0.0.1:{lmtpPort}
"""


class PrivatePostfix:
    """
    A Postfix of the test's own: its configuration, queue and data
    directories under C{root}, its log in C{root/maillog}, smtpd on a
    loopback port, C{master -d} in the foreground.
    """

    #: the configuration files written at start (with the test's
    #: directories and ports put in)
    mainCF = MAIN_CF
    masterCF = MASTER_CF

    def __init__(self, root, lmtpPort):
        self.root = root
        self.smtpPort = freePort()
        self.lmtpPort = lmtpPort
        self.config = root / "etc"
        self.master = None

    def start(self):
        for name in ("etc", "queue", "data"):
            (self.root / name).mkdir(parents=True)
        shutil.chown(self.root / "data", user="postfix")
        (self.config / "main.cf").write_text(self.mainCF.format(root=self.root, lmtpPort=self.lmtpPort))
        (self.config / "master.cf").write_text(self.masterCF.format(smtpPort=self.smtpPort))
        # Postfix reads a main.cf changed within the last second or two
        # again and again, 0.3 s apart, until it has "cooled down" (its
        # load_file.c, against reading a file half written): these are
        # written whole, so dated a minute back they are read at once.
        aMinuteAgo = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config / name, (aMinuteAgo, aMinuteAgo))
        # Creates the queue's directories with Postfix's owners and modes.
        check = subprocess.run(
            [POSTFIX, "-c", str(self.config), "check"], capture_output=True, text=True, timeout=DEADLINE
        )
        assert check.returncode == 0, check.stdout + check.stderr + self.maillog()
        self.master = subprocess.Popen(
            [POSTFIX_MASTER, "-d", "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        waitForPort(self.smtpPort, self.master, "Postfix's smtpd")

    def maillog(self):
        try:
            return (self.root / "maillog").read_text()
        except FileNotFoundError:
            return ""

    def stop(self):
        if self.master is not None:
            stopProcess(self.master)


@pytest.fixture
def postfixRoot(tmp_path):
    """
    A directory for Postfix: its daemons run as the postfix user, which
    must be able to reach it (pytest's own temporary directories are
    private to the user running the suite).
    """
    if POSTFIX is None or not os.path.exists(POSTFIX_MASTER):
        pytest.skip("Postfix is not installed (Debian package postfix; tests/sysdeps.sh installs it)")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix's master must run as root (make test runs as root in CI)")
    import tempfile

    root = tempfile.mkdtemp(prefix="mailgate-postfix-")
    os.chmod(root, 0o755)
    from pathlib import Path

    yield Path(root)
    shutil.rmtree(root, ignore_errors=True)


@sqliteOnly
def test_postfixDeliversByLMTP(mailgate_server, mailgate_cli, postfixRoot):
    server = mailgate_server("--lmtp", "tcp:0:interface=127.0.0.1", "--no-apop")
    mailgate_cli.addUser("alice@example.org", "alice's secret")
    mailgate_cli.addUser("bob@example.org", "bob's secret")
    postfix = PrivatePostfix(postfixRoot, server.portOf("LMTP"))
    try:
        postfix.start()
        message = (
            b"From: bob@example.org\r\nTo: alice@example.org, nobody@example.org\r\n"
            b"Subject: through Postfix\r\nMessage-ID: <pairing@example.org>\r\n\r\n"
            b"delivered by LMTP\r\n"
        )
        with smtplib.SMTP("127.0.0.1", postfix.smtpPort, timeout=DEADLINE) as smtp:
            refused = smtp.sendmail("bob@example.org", ["alice@example.org", "nobody@example.org"], message)
        # Postfix takes both (it does not know mailgate's users) ...
        assert refused == {}
        # ... then mailgate takes one and refuses the other at RCPT, and
        # Postfix bounces it to the sender (also a mailgate user).
        log = waitFor(
            lambda: (lambda text: text if text.count("status=sent") >= 2 and "status=bounced" in text else None)(
                postfix.maillog()
            ),
            "Postfix to deliver the message and the bounce",
        )
        bounced = [line for line in log.splitlines() if "to=<nobody@example.org>" in line]
        assert len(bounced) == 1, log
        assert "dsn=5.1.1, status=bounced" in bounced[0], log
        assert f"relay=127.0.0.1[127.0.0.1]:{server.portOf('LMTP')}" in bounced[0], log
        assert "550 5.1.1" in bounced[0] and "(in reply to RCPT TO command)" in bounced[0], log
        sent = [line for line in log.splitlines() if "to=<alice@example.org>" in line]
        assert len(sent) == 1 and "status=sent" in sent[0], log
    finally:
        postfix.stop()

    # The message is in Alice's maildrop, as it was sent.
    pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    pop.user("alice@example.org")
    pop.pass_("alice's secret")
    _, lines, _ = pop.retr(1)
    pop.quit()
    text = b"\r\n".join(lines)
    assert b"Subject: through Postfix" in text
    assert b"delivered by LMTP" in text
    assert re.search(rb"^Received: from .*postfix\.test", text, re.MULTILINE | re.IGNORECASE)

    # Bob has Postfix's bounce, naming the refused address and the 5.1.1.
    pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    pop.user("bob@example.org")
    pop.pass_("bob's secret")
    count, _ = pop.stat()
    assert count == 1
    _, lines, _ = pop.retr(1)
    pop.quit()
    bounce = b"\r\n".join(lines)
    assert b"Undelivered Mail Returned to Sender" in bounce
    assert b"<nobody@example.org>" in bounce
    assert b"Status: 5.1.1" in bounce


# -- HAProxy -----------------------------------------------------------------------------


HAPROXY_CFG = """\
global
    maxconn 100

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend pop3
    bind 127.0.0.1:{frontPort}
    default_backend mailgate

backend mailgate
    # The documented pairing: PROXY protocol v2 to a haproxy: listener.
    server mailgate 127.0.0.1:{backPort} send-proxy-v2 source 127.0.0.1
"""


@pytest.fixture
def haproxy(tmp_path):
    if HAPROXY is None:
        pytest.skip("HAProxy is not installed (Debian package haproxy; tests/sysdeps.sh installs it)")
    processes = []

    def start(backPort, template=HAPROXY_CFG, **fields):
        frontPort = freePort()
        config = tmp_path / "haproxy.cfg"
        config.write_text(template.format(frontPort=frontPort, backPort=backPort, **fields))
        check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=DEADLINE)
        assert check.returncode == 0, check.stdout + check.stderr
        process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        processes.append(process)
        waitForPort(frontPort, process, "HAProxy")
        return frontPort

    yield start
    for process in processes:
        stopProcess(process)


def popFrom(address, port):
    """
    A POP3 client whose connection comes from C{address} (a loopback
    address other than the balancer's).
    """
    client = poplib.POP3.__new__(poplib.POP3)
    client.host, client.port = "127.0.0.1", port
    client._tls_established = False
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(address, 0))
    client.file = client.sock.makefile("rb")
    client._debugging = 0
    client.welcome = client._getresp()
    return client


@sqliteOnly
def test_haproxyPassesTheClientsAddress(mailgate_server, mailgate_cli, haproxy):
    # Only the client's own address is trusted with plaintext passwords; the
    # balancer (127.0.0.1) is not.
    description = "haproxy:tcp:0:interface=127.0.0.1"
    server = mailgate_server(
        "--pop3", description, "--trusted-network", "127.0.0.3/32", "--no-apop", "--auth-failure-delay", "0"
    )
    mailgate_cli.addUser("alice@example.org", "alice's secret")
    backPort = int(re.search(rf"POP3 listening on 127\.0\.0\.1:(\d+) \({description}\)", server.stdout).group(1))
    front = haproxy(backPort)

    trusted = popFrom("127.0.0.3", front)
    assert trusted.getwelcome().startswith(b"+OK")
    assert "USER" in trusted.capa()
    trusted.user("alice@example.org")
    with pytest.raises(poplib.error_proto):
        trusted.pass_("not alice's secret")
    trusted.quit()
    trusted = popFrom("127.0.0.3", front)
    trusted.user("alice@example.org")
    trusted.pass_("alice's secret")
    assert trusted.stat() == (0, 0)
    trusted.quit()

    untrusted = popFrom("127.0.0.2", front)
    assert "USER" not in untrusted.capa()
    with pytest.raises(poplib.error_proto) as refused:
        untrusted.user("alice@example.org")
        untrusted.pass_("alice's secret")
    assert b"Plaintext authentication disallowed" in refused.value.args[0]
    untrusted.quit()

    # The log names the client's own address, never the balancer's.
    log = waitFor(
        lambda: server.stdout if "pop3 logout user=alice@example.org" in server.stdout else None,
        "the session's log line",
    )
    assert re.search(r"pop3 authentication failed user='alice@example\.org' peer=127\.0\.0\.3:\d+", log), log
    assert re.search(r"pop3 logout user=alice@example\.org peer=127\.0\.0\.3:\d+", log), log
    # (The one session from 127.0.0.1 is the fixture's probe of the
    # frontend, relayed as any client: connected, said nothing, left.)
    balancers = [line for line in log.splitlines() if "peer=127.0.0.1:" in line]
    assert len(balancers) <= 1, log
    assert all("pop3 disconnect" in line and "reason='connection lost'" in line for line in balancers), log


HAPROXY_TLS_CFG = HAPROXY_CFG.replace(
    "bind 127.0.0.1:{frontPort}", "bind 127.0.0.1:{frontPort} ssl crt {certificate}"
).replace("send-proxy-v2 source", "send-proxy-v2-ssl source")


@sqliteOnly
def test_haproxyEndingTheClientsTLSSaysSo(mailgate_server, mailgate_cli, haproxy, tmp_path):
    """
    HAProxy ends the client's TLS (POP3S at the balancer) and tells mailgate
    so (send-proxy-v2-ssl): an untrusted client logs in with USER/PASS, as
    it may over TLS, on a listener where mailgate itself has no TLS.
    """
    import ssl

    from certs import makeCertificate

    certificate, key = makeCertificate(tmp_path, "mail.example.test")
    combined = tmp_path / "haproxy.pem"
    combined.write_bytes(certificate.read_bytes() + key.read_bytes())
    description = "haproxy:tcp:0:interface=127.0.0.1"
    server = mailgate_server(
        "--pop3", description, "--trusted-network", "127.0.0.3/32", "--no-apop", "--auth-failure-delay", "0"
    )
    mailgate_cli.addUser("alice@example.org", "alice's secret")
    backPort = int(re.search(rf"POP3 listening on 127\.0\.0\.1:(\d+) \({description}\)", server.stdout).group(1))
    front = haproxy(backPort, HAPROXY_TLS_CFG, certificate=combined)

    context = ssl.create_default_context(cafile=str(certificate))
    raw = socket.create_connection(("127.0.0.1", front), timeout=DEADLINE, source_address=("127.0.0.2", 0))
    client = poplib.POP3.__new__(poplib.POP3)
    client.host, client.port = "127.0.0.1", front
    client._tls_established = True
    client.sock = context.wrap_socket(raw, server_hostname="mail.example.test")
    client.file = client.sock.makefile("rb")
    client._debugging = 0
    client.welcome = client._getresp()
    assert "USER" in client.capa()
    client.user("alice@example.org")
    client.pass_("alice's secret")
    assert client.stat() == (0, 0)
    client.quit()
    log = waitFor(
        lambda: server.stdout if "pop3 logout user=alice@example.org" in server.stdout else None,
        "the session's log line",
    )
    assert re.search(r"pop3 login user=alice@example\.org peer=127\.0\.0\.2:\d+", log), log


def _greetingFrom(address, port):
    """
    The first line a connection from C{address} through the balancer
    gets, and the socket (still open).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(address, 0))
    return sock.makefile("rb").readline(), sock


@sqliteOnly
def test_haproxyLimitsEachClientAddress(mailgate_server, haproxy):
    """
    Behind the balancer, the per-address connection limit counts each
    client's own address: a second connection from 127.0.0.3 is refused
    while one from 127.0.0.2 is served, though all of them reach mailgate
    from the balancer's address.
    """
    description = "haproxy:tcp:0:interface=127.0.0.1"
    server = mailgate_server(
        "--pop3", description, "--max-connections-per-ip", "1", "--exempt-network", "none", "--no-apop"
    )
    backPort = int(re.search(rf"POP3 listening on 127\.0\.0\.1:(\d+) \({description}\)", server.stdout).group(1))
    front = haproxy(backPort)
    opened = []
    try:
        first, sock = _greetingFrom("127.0.0.3", front)
        opened.append(sock)
        assert first.startswith(b"+OK"), first
        second, sock = _greetingFrom("127.0.0.3", front)
        opened.append(sock)
        assert second == b"-ERR [SYS/TEMP] service temporarily unavailable: too many connections; try again later\r\n"
        other, sock = _greetingFrom("127.0.0.2", front)
        opened.append(sock)
        assert other.startswith(b"+OK"), other
    finally:
        for sock in opened:
            sock.close()


def sessionsCounted(server, protocol):
    """
    The sessions of C{protocol} C{server}'s metrics count so far
    (C{mailgate_sessions_total}).
    """
    import urllib.request

    url = f"http://127.0.0.1:{server.portOf('METRICS')}/metrics"
    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        text = response.read().decode()
    found = re.search(rf'^mailgate_sessions_total\{{protocol="{protocol}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def waitForSessions(server, protocol, count, what, before=0.0):
    """
    Wait until C{server}'s metrics count C{count} sessions of C{protocol}
    more than C{before} (C{mailgate_sessions_total}): a balancer's checks
    have come.
    """
    waitFor(lambda: sessionsCounted(server, protocol) >= before + count, what)


def healthCheckedServer(shared):
    """
    The module's server behind the balancers of the health-check tests:
    SMTP and POP3 on haproxy: listeners, and metrics (each test started
    one with the listener of its protocol).  Each test counts the checks
    of its own balancer from where the count was, and reads the log lines
    written since it began.
    """
    return shared(
        "--smtp", HAPROXY_LISTENER, "--pop3", HAPROXY_LISTENER, "--metrics", "tcp:0:interface=127.0.0.1",
    )


HAPROXY_LISTENER = "haproxy:tcp:0:interface=127.0.0.1"


HAPROXY_SMTP_CHECK_CFG = """\
global
    maxconn 100

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend smtp
    bind 127.0.0.1:{frontPort}
    default_backend mailgate

backend mailgate
    # Checks quicker than HAProxy's 2 s default, from an address of their
    # own, so that v1 headers name it.
    {option}
    server mailgate 127.0.0.1:{backPort} {proxy} check inter 100 source 127.0.0.4
"""


@sqliteOnlyShared
@pytest.mark.parametrize("option", ["", "option smtpchk"], ids=["check", "smtpchk"])
@pytest.mark.parametrize("proxy", ["send-proxy", "send-proxy-v2"])
def test_haproxysHealthChecksAreNoSMTPSessionsInTheLog(shared, haproxy, proxy, option):
    """
    HAProxy's C{check} on a C{send-proxy} server connects with a v1 header
    naming the check's own connection (no C{UNKNOWN}), on a
    C{send-proxy-v2} one with a C{LOCAL} header, and leaves after the
    greeting, or (C{option smtpchk}) after C{HELO localhost} and C{QUIT}:
    no C{smtp disconnect} line for it; a client relayed by the same
    balancer is logged as ever (as is the fixture's probe of the
    frontend, from 127.0.0.1).
    """
    server = healthCheckedServer(shared)
    backPort = server.portOf("SMTP")
    before = sessionsCounted(server, "smtp")
    front = haproxy(backPort, HAPROXY_SMTP_CHECK_CFG, proxy=proxy, option=option)

    waitForSessions(server, "smtp", 5, "five of HAProxy's health checks", before)
    client = smtplib.SMTP("127.0.0.1", front, timeout=DEADLINE, source_address=("127.0.0.2", 0))
    client.ehlo("client.test")
    client.quit()
    log = waitFor(
        lambda: server.stdout if "helo=<client.test>" in server.stdout else None, "the client's disconnect line"
    )
    lines = [line for line in log.splitlines() if "smtp disconnect" in line]
    assert any("peer=127.0.0.2:" in line for line in lines), "\n".join(lines)
    assert not [line for line in lines if "peer=127.0.0.4:" in line], "\n".join(lines)


HAPROXY_POP3_CHECK_CFG = HAPROXY_SMTP_CHECK_CFG.replace("frontend smtp", "frontend pop3")

#: HAProxy's POP3 check as its manual writes one: the greeting, QUIT
#: (waiting for QUIT's answer: else HAProxy resets the connection at once,
#: and the QUIT is lost with it)
POP3_TCP_CHECK = (
    "option tcp-check\n    tcp-check expect string +OK\n    tcp-check send QUIT\\r\\n\n"
    "    tcp-check expect string signing\\ off"
)


@sqliteOnlyShared
@pytest.mark.parametrize("option", ["", POP3_TCP_CHECK], ids=["check", "tcp-check"])
@pytest.mark.parametrize("proxy", ["send-proxy", "send-proxy-v2"])
def test_haproxysHealthChecksAreNoPOP3SessionsInTheLog(shared, haproxy, proxy, option):
    """
    HAProxy's C{check} of a POP3 server, bare (connect, leave) or as a
    C{tcp-check} that reads the greeting and says QUIT, behind a header
    naming no client (C{LOCAL}, or a v1 header naming the check's own
    connection): no C{pop3 disconnect} line for it, every 100 ms here;
    a client relayed by the same balancer that leaves without logging in
    is logged as ever.
    """
    server = healthCheckedServer(shared)
    backPort = int(
        re.search(rf"POP3 listening on 127\.0\.0\.1:(\d+) \({HAPROXY_LISTENER}\)", server.wholeStdout).group(1)
    )
    before = sessionsCounted(server, "pop3")
    front = haproxy(backPort, HAPROXY_POP3_CHECK_CFG, proxy=proxy, option=option)

    waitForSessions(server, "pop3", 5, "five of HAProxy's health checks", before)
    client = popFrom("127.0.0.2", front)
    assert client.getwelcome().startswith(b"+OK")
    client.capa()
    client.quit()
    log = waitFor(
        lambda: server.stdout if re.search(r"pop3 disconnect peer=127\.0\.0\.2:\d+ reason='quit'", server.stdout)
        else None,
        "the client's disconnect line",
    )
    lines = [line for line in log.splitlines() if "pop3 disconnect" in line]
    assert not [line for line in lines if "peer=127.0.0.4:" in line], "\n".join(lines)
