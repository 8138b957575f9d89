"""
A server on the internet under hostile load, beyond what one client's
memory costs: the process's file descriptors running out, logs flooded by
scanners, and clients that trickle a byte every few seconds.

Real C{twistd mailgate} processes (under C{prlimit} for a small open file
limit), real sockets on 127.0.0.1 and other loopback addresses, real SQLite
files.  Every wait is bounded (L{DEADLINE}); no time is asserted.
"""

import contextlib
import os
import re
import select
import signal
import socket
import ssl
import time
import urllib.request

import pytest

from e2e import (  # noqa: F401 (mailgate_server, mailgate_cli are fixtures)
    DEADLINE,
    TWISTD,
    LineReader,
    ServerProcess,
    databaseURL,
    mailgate_cli,
    mailgate_server,
    popLogin,
    sqliteOnly,
    waitFor,
)

ALICE = "alice@example.org"
PASSWORD = "wonder land"


class LimitedServer(ServerProcess):
    """
    C{twistd mailgate} with its open file limit (soft and hard: mailgate
    raises the soft one to the hard one) set to C{files} by C{prlimit}.
    """

    def __init__(self, files, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.command = ("prlimit", f"--nofile={files}:{files}", TWISTD, "-n", "--pidfile=", "mailgate")


@pytest.fixture
def limitedServer(tmp_path):
    """
    Start a L{LimitedServer}: C{limitedServer(files, *options)}; stopped
    when the test ends.
    """
    servers = []

    def start(files, *options):
        server = LimitedServer(files, databaseURL(tmp_path / "mail.sqlite3"), options, cwd=tmp_path)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def addAlice(tmp_path):
    from e2e import AdminCommand

    admin = AdminCommand(databaseURL(tmp_path / "mail.sqlite3"), cwd=tmp_path)
    admin.addUser(ALICE, PASSWORD)
    admin.deliver(ALICE, b"Subject: hello\r\n\r\nhello\r\n")


def metrics(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.portOf('METRICS')}/metrics", timeout=DEADLINE) as r:
        return r.read().decode()


def metricValue(text, name, **labels):
    """
    The value of series C{name} with C{labels} (all of them given), or
    C{None}.
    """
    for line in text.splitlines():
        match = re.match(r"(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return None


def greetings(port, count, sources=50):
    """
    Open C{count} connections from C{sources} addresses from 127.0.3.1 on
    (which no other test uses: their connections in TIME-WAIT are in no
    one's way), then read each one's first line (C{b""} for a connection
    closed unanswered).  Returns C{(sockets, lines)}.
    """
    socks = []
    for i in range(count):
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=DEADLINE, source_address=(f"127.0.3.{1 + i % sources}", 0)
        )
        socks.append(sock)
    return socks, _firstLines(socks)


def _firstLines(socks):
    """
    The first line each socket reads (the greeting or the refusal), or
    C{b""} for one closed or reset unanswered.
    """
    lines = []
    for sock in socks:
        try:
            lines.append(LineReader(sock).line())
        except (EOFError, OSError):
            lines.append(b"")
    return lines


def closeAll(socks):
    for sock in socks:
        sock.close()


# -- 1. file descriptors ---------------------------------------------------------


def test_connectionsBeyondTheOpenFileLimitAreRefusedWithAReason(tmp_path, limitedServer):
    """
    With 512 open files (and max-connections at its default, 5000), the
    server serves what fits (256, the rest kept for the database, the log
    and connections being refused) and tells every other client why, rather
    than closing connections unanswered once accept(2) fails; the limit is
    said at start and in the metrics; a session logged in before goes on
    reading and deleting mail, and logins work again once clients leave.
    """
    addAlice(tmp_path)
    server = limitedServer(512, "--metrics", "tcp:0:interface=127.0.0.1")
    waitFor(
        lambda: re.search(
            r"max-connections 5000 does not fit the 512 open files .* at most 256 connections are served",
            server.stdout,
        ),
        "the warning that the limit was lowered",
    )
    assert metricValue(metrics(server), "mailgate_connections_limit") == 256
    # A user logged in before the flood, whose session goes on through it.
    held = popLogin(server, ALICE, PASSWORD)
    socks, lines = greetings(server.port, 400)
    try:
        served = [line for line in lines if line.startswith(b"+OK")]
        refused = [line for line in lines if line == b"-ERR [SYS/TEMP] service temporarily unavailable: too many connections; try again later\r\n"]
        assert (len(served), len(refused)) == (255, 145), set(lines)
        refusals = metricValue(metrics(server), "mailgate_connections_refused_total", protocol="pop3", reason="too_many")
        assert refusals >= 145
        # Full, and the database works on: a message read and deleted.
        assert b"hello" in b"\n".join(held.retr(1)[1])
        held.dele(1)
        assert held.quit().startswith(b"+OK")
    finally:
        closeAll(socks)
    client = waitFor(lambda: _loginOrNone(server), "a login once the connections closed")
    assert client.stat() == (0, 0)
    client.quit()
    assert "EMFILE" not in server.stdout, server.log()


def test_twistedsSpareDescriptorLostIsAWarningAMinuteNotATraceback():
    """
    Twisted keeps one spare descriptor for the process, to accept and
    close connections once descriptors run out; when another thread takes
    the one it freed, Twisted logs a critical error with a traceback at
    every attempt to take it back.  mailgate makes that one warning a
    minute, counting the attempts, with no traceback.
    """
    import errno

    from twisted.internet import tcp
    from twisted.internet.task import Clock
    from twisted.logger import LogLevel, globalLogPublisher

    from mailgate.session.accepting import watchReserve

    def noDescriptorLeft():
        raise OSError(errno.EMFILE, "Too many open files")

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        reservation = tcp._FileDescriptorReservation(noDescriptorLeft)
        clock = Clock()
        watcher = watchReserve(clock, reservation)
        assert watchReserve(clock, reservation) is None  # once
        for _ in range(3):
            reservation.reserve()
        clock.advance(30)
        reservation.reserve()
        clock.advance(31)
        reservation.reserve()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert watcher.failures == 5
    logged = [(e.get("event"), e.get("count"), e["log_level"]) for e in events if "log_failure" not in e]
    assert logged == [
        ("listener.no_spare_descriptor", 1, LogLevel.warn),
        ("listener.no_spare_descriptor", 4, LogLevel.warn),
    ]
    # The counts agree with their noun: "1 time", "4 times".
    from twisted.logger import formatEvent

    said = [formatEvent(e) for e in events if e.get("event") == "listener.no_spare_descriptor"]
    assert ["(1 time since" in said[0], "(4 times since" in said[1]] == [True, True], said
    assert not any("log_failure" in e for e in events)


def _loginOrNone(server):
    try:
        return popLogin(server, ALICE, PASSWORD)
    except Exception:
        return None


def test_runningOutOfDescriptorsIsOneWarningNotALinePerConnection(tmp_path, limitedServer):
    """
    With 128 open files, a backlog of 300 connections (piled up while the
    server was stopped) takes every descriptor: accept(2) fails with
    EMFILE, and connections are closed unanswered.  That is said in one
    warning (listener.out_of_descriptors, at most one a minute) and counted
    in mailgate_connections_refused_total{reason="no_descriptors"}, not in
    three log lines per connection as Twisted writes them; the server then
    serves as before.
    """
    addAlice(tmp_path)
    server = limitedServer(128, "--metrics", "tcp:0:interface=127.0.0.1")
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        socks = [
            socket.create_connection(
                ("127.0.0.1", server.port), timeout=DEADLINE, source_address=(f"127.0.3.{1 + i % 50}", 0)
            )
            for i in range(300)
        ]
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    try:
        lines = _firstLines(socks)
        unanswered = lines.count(b"")
        assert unanswered, "the descriptors did not run out: nothing to look at"
        text = metrics(server)
        assert metricValue(text, "mailgate_connections_refused_total", protocol="pop3", reason="no_descriptors") == (
            unanswered
        )
    finally:
        closeAll(socks)
    client = waitFor(lambda: _loginOrNone(server), "a login once the connections closed")
    assert client.stat() == (1, 25)
    client.quit()
    outOfDescriptors = r"POP3 on 127\.0\.0\.1:\d+ cannot accept connections: out of file descriptors.*"
    # The burst's hundreds of lines may still be on their way to the log
    # (its writing thread takes them in turn): the warning is waited for.
    waitFor(lambda: re.search(outOfDescriptors, server.stdout), "the out-of-descriptors warning in the log")
    log = server.stdout
    warnings = re.findall(outOfDescriptors, log)
    assert len(warnings) == 1, log
    # Written at the end of the burst's first turn: it counts what that
    # turn closed (or, if Twisted's reserve was taken, put off).
    closed = int(re.search(r"\(EMFILE\); (\d+) connections? closed unanswered", warnings[0]).group(1))
    assert closed <= unanswered, warnings
    assert "EMFILE recovery" not in log and "Re-reserving" not in log, log[-3000:]



#: A .tac running mailgate in a process whose descriptors are all taken
#: (by /dev/null) once it serves, until SIGUSR2 gives them back; and
#: without Twisted's reserved descriptor, as when another thread took it
#: while the accept loop had freed it: accept(2) then fails, and Twisted
#: leaves the connection waiting.
_NO_DESCRIPTORS_TAC = """
import os, signal
from twisted.application import service
from twisted.internet import reactor, tcp
from mailgate.service import MailgateConfig, makeService

tcp._reservedFD = tcp._NullFileDescriptorReservation()
application = service.Application("mailgate")
config = MailgateConfig(
    database=os.environ["DATABASE"], pop3=["tcp:0:interface=127.0.0.1"], hostname="mailgate.test"
)
makeService(config).setServiceParent(application)
taken = []

def takeAll():
    try:
        while True:
            taken.append(open(os.devnull))
    except OSError:
        print("descriptors all taken", flush=True)

def giveBack():
    while taken:
        taken.pop().close()
    print("descriptors given back", flush=True)

signal.signal(signal.SIGUSR2, lambda *_: reactor.callFromThread(giveBack))
reactor.callWhenRunning(reactor.callLater, 1.0, takeAll)
"""


class TacServer(ServerProcess):
    """
    C{twistd -n -y FILE.tac} under C{prlimit}.
    """

    def __init__(self, tac, files, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tac = tac
        self.command = ("prlimit", f"--nofile={files}:{files}", TWISTD, "-n", "--pidfile=", "-y", str(tac))

    @property
    def argv(self):
        return list(self.command)


def cpuTicks(pid):
    """
    The user and system CPU time the process C{pid} has used, in clock
    ticks.
    """
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_aListenerThatCannotAcceptWaitsInsteadOfSpinning(tmp_path):
    """
    A process with no descriptor left (nor Twisted's reserve) cannot accept
    a waiting connection: Twisted logs "Could not accept new connection"
    and returns, the listening socket is still readable, and the reactor
    looped at 100 % CPU writing that line each turn.  Now the listener
    stops trying for a quarter of a second at a time, says so in one
    warning, and serves the waiting client once descriptors are freed.
    """
    addAlice(tmp_path)
    tac = tmp_path / "mailgate.tac"
    tac.write_text(_NO_DESCRIPTORS_TAC)
    server = TacServer(
        tac, 256, databaseURL(tmp_path / "mail.sqlite3"), cwd=tmp_path,
        env={"DATABASE": databaseURL(tmp_path / "mail.sqlite3")}, expect={"POP3": 1},
    )
    try:
        server.start()
        waitFor(lambda: "descriptors all taken" in server.stdout, "the descriptors to be taken")
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
        with sock:
            waitFor(lambda: "cannot accept connections" in server.stdout, "the warning")
            before = cpuTicks(server.process.pid)
            time.sleep(1.0)
            used = cpuTicks(server.process.pid) - before
            ticks = os.sysconf("SC_CLK_TCK")
            assert used < ticks / 2, f"{used} ticks of CPU in a second of waiting: spinning"
            os.kill(server.process.pid, signal.SIGUSR2)
            assert LineReader(sock).line().startswith(b"+OK")
        log = server.stdout
        assert len(re.findall("cannot accept connections", log)) == 1, log[-3000:]
        assert "Could not accept new connection" not in log, log[-3000:]
    finally:
        server.stop()


# -- 2. log flooding ---------------------------------------------------------------


def sessionLines(port, lines, source):
    """
    Send C{lines} on one connection from C{source}, reading the greeting
    first and every reply line; return once the server closed it (or
    every line was answered).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))
    reader = LineReader(sock)
    try:
        reader.line()
        for line in lines:
            try:
                sock.sendall(line)
                reader.line()
            except (EOFError, OSError):
                return
    finally:
        sock.close()


@sqliteOnly
def test_aHostileClientCostsALineASession(mailgate_server, mailgate_cli):
    """
    A scanner's session of garbage commands (POP3, SMTP) and one of wrong
    passwords end with one session.too_many_errors line each (who, from
    where, why), as Dovecot's "Too many invalid commands"; the commands
    themselves are not logged.  A banned address that connects again and
    again has one session.refused line a minute, saying how many it was
    refused since, and every refusal is counted in the metrics.
    """
    server = mailgate_server(
        "--exempt-network", "none", "--auth-failure-delay", "0", "--auth-penalty-max", "0", "--ban-after", "3",
        "--smtp", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1",
        # Errors 10 to 19 answered at once, not a second each (test_e2e_harvest).
        "--smtp-error-sleep-time", "0",
    )
    mailgate_cli.addUser(ALICE, PASSWORD)
    source = "127.0.3.60"
    sessionLines(server.port, [b"XYZZY %d\r\n" % i for i in range(100)], source)
    sessionLines(server.portOf("SMTP"), [b"FOO %d\r\n" % i for i in range(100)], source)
    waitFor(lambda: server.stdout.count("session closed") == 2, "the two sessions' lines")
    assert re.search(r"pop3 session closed peer=127\.0\.3\.60:\d+ reason=too many bad commands count=20", server.stdout)
    assert re.search(r"smtp session closed peer=127\.0\.3\.60:\d+ reason=too many bad commands count=20", server.stdout)
    assert "XYZZY" not in server.stdout and "FOO" not in server.stdout
    # Wrong passwords until the session is closed: the third bans the address.
    attacker = "127.0.3.61"
    guesses = [line for i in range(5) for line in (b"USER %s\r\n" % ALICE.encode(), b"PASS wrong%d\r\n" % i)]
    sessionLines(server.port, guesses, attacker)
    waitFor(lambda: "reason=too many failed logins" in server.stdout, "the failed logins' session line")
    assert re.search(r"pop3 session closed peer=127\.0\.3\.61:\d+ reason=too many failed logins count=3", server.stdout)
    # The banned address hammers: 50 connections, each refused, one line.
    replies = {_refusedLine(server.port, attacker) for _ in range(50)}
    assert replies == {b"-ERR [SYS/TEMP] banned\r\n"}, replies
    # The server logs the first refusal before it answers it, but a thread
    # of the test's reads its output: on a loaded machine the line can
    # reach the test after the 50th reply (seen once in a full run).
    refused = waitFor(
        lambda: [line for line in server.stdout.splitlines() if "connection refused peer=127.0.3.61" in line],
        "the refusal's line",
    )
    assert len(refused) == 1, refused
    assert metricValue(metrics(server), "mailgate_connections_refused_total", protocol="pop3", reason="banned") == 50


def _refusedLine(port, source):
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))
    try:
        return LineReader(sock).line()
    except (EOFError, OSError):
        return b""
    finally:
        sock.close()


@sqliteOnly
def test_aScannerOnThePop3sPortCostsALineAMinute(tmp_path, mailgate_server):
    """
    Plain text, HTTP and random bytes sent to port 995 fail the TLS
    handshake: each is counted in mailgate_tls_failures_total, and one
    address has one session.tls_failed line a minute for each reason
    (with how many were not logged since), not one per connection.
    """
    from certs import makeCertificate

    certificate, key = makeCertificate(tmp_path, "mailgate.test")
    server = mailgate_server(
        "--pop3s", "tcp:0:interface=127.0.0.1", "--tls-cert", str(certificate), "--tls-key", str(key),
        "--metrics", "tcp:0:interface=127.0.0.1",
    )
    scanner = "127.0.3.62"
    payloads = [b"USER alice\r\n", b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\x05garbage" + bytes(range(256))]
    for payload in payloads:
        for _ in range(30):
            sock = socket.create_connection(
                ("127.0.0.1", server.portOf("POP3S")), timeout=DEADLINE, source_address=(scanner, 0)
            )
            try:
                sock.sendall(payload)
                while sock.recv(4096):
                    pass
            except OSError:
                pass
            finally:
                sock.close()
    failures = waitFor(
        lambda: metricValue(metrics(server), "mailgate_tls_failures_total", protocol="pop3") == 90 or None,
        "90 TLS failures counted",
    )
    assert failures
    lines = [line for line in server.stdout.splitlines() if "TLS failed peer=127.0.3.62" in line]
    reasons = {re.search(r"reason=(\S+)", line).group(1) for line in lines}
    assert len(lines) == len(reasons) <= 3, lines



def _tlsClient(port, source, certificate):
    """
    A real TLS client on C{port} from C{source}, its handshake done.
    """
    context = ssl.create_default_context(cafile=str(certificate))
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


@sqliteOnly
def test_aRefusedPop3sClientThatNeverFinishesItsHandshakeIsClosedSoon(tmp_path, mailgate_server):
    """
    A connection refused as it arrives on --pop3s (here over
    --max-connections-per-ip) waits for its TLS handshake only briefly
    (TLSLayer.refusalTimeout), since it holds a descriptor counted in no
    limit: a real TLS client still reads why it was refused, while one
    that connects and never sends its ClientHello (a scanner) is closed
    well before the 10 s (TLSLayer.closeTimeout) it used to hold its
    descriptor for.
    """
    from certs import makeCertificate

    from mailgate.session.tlslayer import TLSLayer

    certificate, key = makeCertificate(tmp_path, "mailgate.test")
    server = mailgate_server(
        "--pop3s", "tcp:0:interface=127.0.0.1", "--tls-cert", str(certificate), "--tls-key", str(key),
        "--exempt-network", "none", "--max-connections-per-ip", "1", "--metrics", "tcp:0:interface=127.0.0.1",
    )
    port = server.portOf("POP3S")
    source = "127.0.3.63"
    held = _tlsClient(port, source, certificate)
    try:
        assert LineReader(held).line().startswith(b"+OK")
        refused = _tlsClient(port, source, certificate)
        with refused:
            assert LineReader(refused).line() == b"-ERR [SYS/TEMP] service temporarily unavailable: too many connections; try again later\r\n"
        silent = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))
        with silent:
            # A bounded wait shorter than closeTimeout: before the fix the
            # server held the connection for all of it.
            silent.settimeout(TLSLayer.closeTimeout - 1)
            try:
                end = silent.recv(1)
            except ConnectionResetError:
                end = b""
            except TimeoutError:
                pytest.fail(f"a refused connection silent in its handshake still open after {TLSLayer.closeTimeout - 1} s")
            assert end == b""
        counted = metricValue(metrics(server), "mailgate_connections_refused_total", protocol="pop3", reason="too_many")
        assert counted == 2
    finally:
        held.close()


@sqliteOnly
def test_aStrangerOnTheBalancersPortCostsALineAMinute(mailgate_server):
    """
    Something that is no balancer connecting again and again to a
    haproxy: listener is closed unread each time, with one
    session.proxy_refused line a minute per address and reason, not one
    per connection.
    """
    server = mailgate_server("--pop3", "haproxy:tcp:0:interface=127.0.0.1", "--proxy-network", "192.0.2.0/24")
    stranger = "127.0.3.63"
    for _ in range(30):
        # Closed unread: an end of file, or a reset (the server aborts it,
        # sometimes before connect() has returned here).
        try:
            sock = socket.create_connection(
                ("127.0.0.1", server.portOf("POP3", 1)), timeout=DEADLINE, source_address=(stranger, 0)
            )
            with sock:
                sock.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 1 110\r\n")
                assert sock.recv(100) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass
    # A last connection from elsewhere, whose line says the others were
    # handled; it too may be reset before connect() has returned.
    try:
        sock = socket.create_connection(("127.0.0.1", server.portOf("POP3", 1)), timeout=DEADLINE)
        with sock:
            assert sock.recv(100) == b""
    except ConnectionResetError:
        pass
    waitFor(lambda: "PROXY header refused from 127.0.0.1:" in server.stdout, "the last refusal's line")
    lines = [line for line in server.stdout.splitlines() if "PROXY header refused from 127.0.3.63:" in line]
    assert len(lines) == 1, lines


# -- 4. slow loris ---------------------------------------------------------------


def trickle(sock, data, interval):
    """
    Send C{data} an octet every C{interval} seconds, until the server
    closes the connection; return how many octets were sent then, or
    C{None} if it never did.
    """
    for sent, octet in enumerate(data):
        try:
            sock.sendall(bytes([octet]))
            readable, _, _ = select.select([sock], [], [], interval)
            if readable and not sock.recv(4096, socket.MSG_PEEK):
                return sent + 1
            if readable:
                sock.recv(4096)
        except OSError:
            return sent
    return None


@pytest.mark.parametrize(
    "options, timeout",
    [({"loginTimeout": 180}, 180), ({"loginTimeout": 0, "idleTimeout": 600}, 600)],
    ids=["login-timeout", "idle-timeout"],
)
def test_aTimeoutInTheTLSHandshakeClosesTheConnectionAtOnce(store, tls, options, timeout):
    """
    A POP3S client that never finishes its TLS handshake (a ClientHello
    trickled, or none) is cut when its login or idle timeout ends, not 10 s
    later: the close used to wait for the handshake
    (C{TLSLayer.closeTimeout}) as if the client could still read why,
    holding the descriptor and the slot; near the connection limit, idle
    sessions due out after 10 s took 20 (measured on a real server).
    """
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from mailgate.session.tlslayer import TLSLayerFactory
    from mailgate.testing import pop3Factory

    class TCPStringTransport(StringTransport):
        def setTcpNoDelay(self, enabled):
            pass

    clock = Clock()
    layer = TLSLayerFactory(tls, pop3Factory(store, clock, **options), clock).buildProtocol(None)
    transport = TCPStringTransport()
    layer.makeConnection(transport)
    layer.dataReceived(b"\x16\x03\x01")  # the start of a ClientHello, no more
    clock.advance(timeout - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnected  # aborted, unanswered
    assert transport.value() == b""


@sqliteOnly
def test_aLineTrickledAnOctetAtATimeDoesNotKeepASession(mailgate_server, mailgate_cli):
    """
    A logged-in POP3 client (--idle-timeout 1) that sends a command an
    octet every 0.25 seconds, never ending the line, is idle: closed after
    the idle timeout, not kept as long as octets come.  (Before login, the
    login timeout bounds it anyway.)
    """
    server = mailgate_server("--idle-timeout", "1")
    mailgate_cli.addUser(ALICE, PASSWORD)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
    reader = LineReader(sock)
    try:
        assert reader.line().startswith(b"+OK")
        sock.sendall(b"USER %s\r\nPASS %s\r\n" % (ALICE.encode(), PASSWORD.encode()))
        assert reader.line().startswith(b"+OK") and reader.line().startswith(b"+OK")
        sent = trickle(sock, b"NOOP" + b" " * 76, 0.25)
        assert sent is not None and sent < 40, "the session outlived 80 octets trickled over 20 s"
    finally:
        sock.close()
    waitFor(lambda: "reason='idle timeout'" in server.stdout, "the logout line")



@sqliteOnly
def test_anSMTPClientThatOnlyKeepsItsConnectionBusyIsClosed(mailgate_server):
    """
    NOOP (or RSET, VRFY, HELP, or EHLO again) every few minutes restarts
    the idle timer for ever.  As with Postfix's smtpd_junk_command_limit,
    past 100 such commands since the last delivered message (the EHLO
    that began the session is one), each counts as an error: 20 more, and
    the client is told 421 4.7.0 and disconnected.
    """
    server = mailgate_server("--smtp", "tcp:0:interface=127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", server.portOf("SMTP")), timeout=DEADLINE)
    reader = LineReader(sock)
    with sock:
        assert reader.line().startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        while not reader.line().startswith(b"250 "):
            pass
        replies = []
        for _ in range(200):
            try:
                sock.sendall(b"NOOP\r\n")
                replies.append(reader.line())
            except (EOFError, OSError):
                break
            if replies[-1].startswith(b"421"):
                break
    assert replies.count(b"250 2.0.0 OK\r\n") == 119, replies[-3:]
    assert replies[-1].startswith(b"421 4.7.0 ") and b"too many errors" in replies[-1], replies[-3:]



@sqliteOnly
def test_nearTheConnectionLimitIdleClientsThatHaveNotLoggedInAreClosedSoon(mailgate_server, mailgate_cli):
    """
    As Postfix's stress mode: with 8 of at most 10 connections open, the
    sessions of clients that have not logged in (every SMTP session) are
    closed after 10 seconds of idleness instead of 5 minutes, those
    already open included, until fewer than 7 are left: idle connections
    cannot keep everyone else out.  The 7 idle timers come due together,
    and only 2 sessions are closed (those closing count as gone, their
    connections being let go only a turn later).  A logged-in POP3 user
    keeps its session; the stress and its end are logged.
    """
    server = mailgate_server("--smtp", "tcp:0:interface=127.0.0.1", "--max-connections", "10")
    mailgate_cli.addUser(ALICE, PASSWORD)
    user = popLogin(server, ALICE, PASSWORD)
    idle = []
    try:
        for _ in range(7):
            sock = socket.create_connection(("127.0.0.1", server.portOf("SMTP")), timeout=DEADLINE)
            idle.append((sock, LineReader(sock)))
            assert idle[-1][1].line().startswith(b"220 ")
        waitFor(lambda: "idle timeouts as usual again" in server.stdout, "idle clients closed, the stress over")
        # The end of the stress is logged as the second session is closed,
        # before its 421 has left: wait for the replies.  The rest keep
        # the usual timeout (5 minutes); any closed with the two (had the
        # stress not ended) would have had their 421 sent with theirs.
        waitFor(
            lambda: len(select.select([sock for sock, _ in idle], [], [], 0)[0]) >= 2, "the 421 of 2 sessions"
        )
        closed = []
        for sock, reader in idle:
            if select.select([sock], [], [], 0)[0]:
                assert reader.line().startswith(b"421 4.4.2 ")
                closed.append(sock)
        # Closed until fewer than 7 connections were left.
        assert len(closed) == 2, len(closed)
        assert user.noop().startswith(b"+OK")
        user.quit()
    finally:
        for sock, _ in idle:
            sock.close()
    assert re.search(r"8 connections of at most 10: clients that have not logged in are closed", server.stdout)


@contextlib.contextmanager
def _metricsConnection(clock):
    """
    A connection to a metrics site (its timers on C{clock}), in memory:
    C{(protocol, transport)}; the site stopped afterwards.
    """
    from twisted.internet import defer
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from mailgate.metrics import Metrics
    from mailgate.metricssite import metricsSite

    site = metricsSite(Metrics(), lambda: defer.succeed(None), clock)
    site.startFactory()
    try:
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        transport = StringTransport()
        protocol.makeConnection(transport)
        yield protocol, transport
    finally:
        site.stopFactory()


def test_theMetricsPortClosesARequestTrickledAnOctetAtATime():
    """
    An HTTP request to the metrics port whose line and headers come an
    octet every five seconds is answered 408 and closed after
    C{requestTimeout} seconds from its first octet, though each octet
    would start Twisted's idle timeout again: 32 such clients held every
    connection the port takes.  A scraper keeping its connection idle
    between scrapes is not affected, nor is a request sent at once.
    """
    from twisted.internet.task import Clock

    from mailgate.metricssite import IDLE_TIMEOUT, MetricsChannel

    clock = Clock()
    with _metricsConnection(clock) as (protocol, transport):
        # Idle, then a request at once: answered, the connection kept.
        clock.advance(IDLE_TIMEOUT - 5)
        protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n") and not transport.disconnecting
        transport.clear()
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        sent = 0
        while not transport.disconnecting and sent < len(request):
            protocol.dataReceived(request[sent:sent + 1])
            sent += 1
            clock.advance(5)
        assert transport.disconnecting, "the trickled request kept its connection"
        assert sent * 5 <= MetricsChannel.requestTimeout + 5
        assert transport.value().startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize(
    "request_, status",
    [
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n", b"414 "),
        (b"GET /metrics HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n", b"431 "),
    ],
    ids=["request line", "header line"],
)
def test_theMetricsPortAnswersALineTooLongWithItsReason(request_, status):
    """
    A request line or header line over Twisted's 16 KiB is answered 414
    or 431 with the limit, then the connection closed: the line reader
    closed it without a word.  Whatever follows is not answered again.
    """
    from twisted.internet.task import Clock

    with _metricsConnection(Clock()) as (protocol, transport):
        protocol.dataReceived(request_)
        protocol.dataReceived(b"b" * 20000)
        answer = transport.value()
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
        assert answer.count(b"HTTP/1.1") == 1
        assert answer.endswith(b"too long (the limit is 16384 octets)\n")
        assert transport.disconnecting


# -- the database while the server serves ------------------------------------------


def _locksOn(path):
    """
    The POSIX locks this process holds on the file C{path}, as
    C{/proc/locks} lists them, without each line's ordinal (which moves
    as other processes take and drop locks).
    """
    found = os.stat(path)
    inode = f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}:{found.st_ino}"
    pid = str(os.getpid())
    with open("/proc/locks") as locks:
        return [
            line.split(":", 1)[1].strip()
            for line in locks
            if "POSIX" in line and pid in line.split() and inode in line.split()
        ]


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="Linux's /proc/locks")
def test_openingAConnectionKeepsTheLocksOfTheOthers(tmp_path):
    """
    A server's worker thread opening its connection narrows the database's
    side files first; that must not drop the lock its other connections
    hold on -shm (closing any descriptor of a file drops every POSIX lock
    of the process on it).  Without that lock, the admin command run
    meanwhile (mailgate user add) took itself for the database's only user,
    emptied -shm, and the server died of SIGBUS at its next commit.
    """
    import sqlite3

    from mailgate.store.sqlite import narrowSideFiles

    path = str(tmp_path / "mail.sqlite3")
    first = sqlite3.connect(path)
    try:
        first.execute("PRAGMA journal_mode = WAL")
        first.execute("CREATE TABLE t (x)")
        first.commit()
        first.execute("SELECT count(*) FROM t").fetchall()
        held = _locksOn(path + "-shm")
        assert held, "an open WAL connection holds a lock on -shm"
        os.chmod(path + "-shm", 0o644)
        os.chmod(path, 0o600)
        narrowSideFiles(path)
        assert _locksOn(path + "-shm") == held
        # And the side file is narrowed all the same.
        assert os.stat(path + "-shm").st_mode & 0o777 == 0o600
    finally:
        first.close()


class _RecordedTimers:
    """
    A L{PumpedReactor} whose timers the test fires itself.
    """

    def __init__(self):
        from pumped import PumpedReactor

        self.pumped = PumpedReactor()
        self.timers = []

    def __getattr__(self, name):
        return getattr(self.pumped, name)

    def callLater(self, delay, function, *args):
        self.timers.append((delay, function, args))
        return self.pumped.callLater(delay, function, *args)


def test_aReadThatWaitsTooLongForAConnectionFailsAsTemporary():
    """
    With every reader thread stuck (a table locked by a migration, a
    database that stopped answering), reads queued behind them fail as a
    temporary failure (what clients see as -ERR [SYS/TEMP] or 451) once
    they waited the pool's limit, without running, rather than each waiting
    for every stuck read before it; the threads serve again once free.
    """
    import threading
    import time

    from mailgate.errors import TemporaryFailure
    from mailgate.store.database import WorkerThreads

    reactor = _RecordedTimers()
    workers = WorkerThreads(reactor, 1, "hostile-readers", maxWait=0.05)
    workers.start()
    gate = threading.Event()
    ran = []
    try:
        stuck = workers.submit(lambda: gate.wait(DEADLINE))
        queued = [workers.submit(ran.append, i) for i in range(3)]
        [(delay, sweep, args)] = reactor.timers
        assert delay == 0.05
        time.sleep(0.1)
        sweep(*args)
        failures = [reactor.wait(d) for d in queued]
        assert all(f.check(TemporaryFailure) for f in failures), failures
        assert "database busy" in failures[0].getErrorMessage()
        gate.set()
        assert reactor.wait(stuck) is True
        assert reactor.wait(workers.submit(lambda: "served")) == "served"
        assert ran == []
    finally:
        gate.set()
        workers.stop()
