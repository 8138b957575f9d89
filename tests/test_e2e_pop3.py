"""
End-to-end tests of the POP3 core: a real C{twistd mailgate} process (as
installed, non-editable), the real C{mailgate} admin command, and real
clients (Python's poplib, raw sockets, curl) over 127.0.0.1.

Every test that starts a server runs on both backends (the fixtures of
tests/e2e.py are parametrised over SQLite and PostgreSQL), except those
about SQLite itself or about start-up, which are pinned to SQLite.

The tests whose server is only the other end of their client exchanges
share one per set of options and backend (tests/sharedserver.py), each with
maildrops of its own; those about starting, restarting or stopping it, or
about an option of their own, start their own.

These assert what a user sees: command output and exit statuses, POP3
responses on the wire, what a later session finds.  Every socket and every
subprocess wait is bounded (see L{e2e.DEADLINE}); nothing asserts on
wall-clock time.
"""

import base64
import hashlib
import os
import poplib
import re
import shutil
import signal
import socket
import sys
import zipfile
from pathlib import Path

import pytest

from e2e import (  # noqa: F401 (mailgate_server is a fixture)
    TWISTD,
    LineReader,
    connect,
    databaseURL,
    dotStuffed,
    mailgate_cli,
    mailgate_server,
    pop,
    popLogin as login,
    runCommand,
    sqliteOnly,
    waitFor,
)
from sharedserver import shared, sharedBackend, sharedServers, sqliteOnlyShared  # noqa: F401 (fixtures)

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
ALICE_PW = "wonder land"  # a space: PASS takes the rest of the line
BOB_PW = "builder"
CAROL_PW = "c4rol"

# Failed logins are answered after this delay; short, to keep tests fast.
FAST_FAILURES = ("--auth-failure-delay", "0.05")

REPO = Path(__file__).resolve().parent.parent


def message(subject, body=b"hello\n"):
    """
    A message as an MTA would pipe it to C{mailgate deliver}: LF line ends.
    """
    return b"From: sender@example.net\nSubject: " + subject.encode() + b"\n\n" + body


def crlf(data):
    """
    What C{mailgate deliver} stores for C{data}: every line end CRLF.
    """
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def octetsIn(response):
    """
    The first number in a status line such as C{+OK 123 octets}.
    """
    match = re.match(rb"\+OK (\d+)", response)
    assert match, response
    return int(match.group(1))


def retryLogin(server, address, password):
    """
    Log in, retrying while the maildrop is still locked by a session the
    server has not yet seen go away (it notices a closed socket
    asynchronously).  Any other failure fails at once.
    """

    def attempt():
        client = pop(server)
        try:
            client.user(address)
            client.pass_(password)
        except poplib.error_proto as e:
            client.close()
            if b"[IN-USE]" in e.args[0]:
                return None
            raise
        return client

    return waitFor(attempt, f"the maildrop of {address} to be unlocked")


def withAnAPOPUser(cli):
    """
    Give a shared server's database a user with APOP before the server
    starts: greetings carry an APOP timestamp while some user has APOP
    (L{mailgate.pop3.factory.APOPAdvertiser}), as on the servers of the
    tests that add one before starting theirs.  The tests that add users
    with APOP share this server, so that on the other servers greetings
    never carry one, as on a server where nobody has APOP.
    """
    cli.addUser("apop-user@example.org", "apop secret", apop=True)


# -- 1. the admin command and poplib -------------------------------------


def test_cliRoundTrip(shared):
    """
    Users added and mail delivered with the C{mailgate} command are served
    over POP3; what a client deletes is gone for the admin command too.
    """
    server = shared(*FAST_FAILURES, prepare=withAnAPOPUser)
    mailgate_cli = shared.cli(server, installed=True)
    alice = shared.address("alice")
    bob = shared.address("bob")
    # The installed command (addUser runs it in-process, hashing cheaply).
    out = mailgate_cli.check("user", "add", alice, "--password-stdin", input=ALICE_PW + "\n")
    assert out.strip() == f"added {alice}"
    out = mailgate_cli.check("user", "add", bob, "--password-stdin", "--apop", input=BOB_PW + "\n")
    assert out.strip() == f"added {bob} (APOP enabled)"
    code, out, err = mailgate_cli("user", "add", alice, "--password-stdin", input="x\n")
    assert code == 73 and f"mailgate: user {alice} already exists" in err

    sent = message("round trip", b"first line\nsecond line\n")
    uid = mailgate_cli.deliver(alice, sent)
    bobUid = mailgate_cli.deliver(bob, message("for bob"))
    # An unknown recipient: EX_NOUSER, and nothing delivered to anybody.
    code, out, err = mailgate_cli("deliver", alice, "nobody@example.org", input=message("lost"))
    assert code == 67, (code, out, err)
    assert "no such user: nobody@example.org" in err

    stored = crlf(sent)
    assert mailgate_cli.mailbox(alice) == [(1, len(stored), uid)]
    users = mailgate_cli.users()
    assert users[alice] == (1, len(stored), "off")
    assert users[bob] == (1, len(crlf(message("for bob"))), "on")

    client = login(server, alice, ALICE_PW)
    assert client.stat() == (1, len(stored))
    status, listing, _ = client.list()
    assert status.startswith(b"+OK")
    assert listing == [b"1 %d" % len(stored)]
    status, uids, _ = client.uidl()
    assert uids == [b"1 " + uid.encode()]
    assert client.uidl(1).split()[1:] == [b"1", uid.encode()]
    status, lines, octets = client.retr(1)
    assert octetsIn(status) == len(stored)
    assert lines == stored.split(b"\r\n")[:-1]
    assert octets == len(stored)
    assert client.dele(1).startswith(b"+OK")
    assert client.quit().startswith(b"+OK")

    assert mailgate_cli.mailbox(alice) == []
    users = mailgate_cli.users()
    assert users[alice] == (0, 0, "off")
    assert users[bob][0] == 1
    assert [row[2] for row in mailgate_cli.mailbox(bob)] == [bobUid]


# -- 2. APOP -------------------------------------------------------------


def test_apop(shared):
    """
    APOP as a client computes it from the greeting works for a user with
    APOP enabled, and fails like a wrong password for any other user.
    """
    server = shared(*FAST_FAILURES, prepare=withAnAPOPUser)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    bob = shared.address("bob")
    mailgate_cli.addUser(alice, ALICE_PW)
    mailgate_cli.addUser(bob, BOB_PW, apop=True)
    mailgate_cli.deliver(bob, message("apop"))

    client = pop(server)
    timestamp = re.search(rb"<[^<>]*@mailgate\.test>", client.getwelcome())
    assert timestamp, client.getwelcome()
    assert client.apop(bob, BOB_PW).startswith(b"+OK")
    assert client.stat()[0] == 1
    client.quit()

    client = pop(server)
    with pytest.raises(poplib.error_proto) as failure:
        client.apop(bob, "not the password")
    assert failure.value.args[0].startswith(b"-ERR [AUTH]")
    client.close()

    # Alice has a password but no APOP secret.
    client = pop(server)
    with pytest.raises(poplib.error_proto) as failure:
        client.apop(alice, ALICE_PW)
    assert failure.value.args[0].startswith(b"-ERR [AUTH]")
    # The session goes on: USER/PASS still works.
    client.user(alice)
    assert client.pass_(ALICE_PW).startswith(b"+OK")
    client.quit()


@sqliteOnlyShared
def test_aLatin1PasswordImportedFromDovecotLogsInWithPass(shared, tmp_path):
    """
    A user moved from Dovecot whose password hash is of Latin-1 octets
    (set by a client in that character set, which sends it so) logs in
    with USER/PASS as with Dovecot: the PASS line was refused as not
    UTF-8.
    """
    server = shared(*FAST_FAILURES)
    mailgate_cli = shared.cli(server)
    erin = shared.address("erin")
    password = "gr\u00fcn"
    digest = base64.b64encode(hashlib.sha256(password.encode("latin-1")).digest()).decode()
    (tmp_path / "passwd").write_text(f"{erin}:{{SHA256}}{digest}::::::\n")
    mailgate_cli.check("user", "import", str(tmp_path / "passwd"))
    client = pop(server)
    client.encoding = "latin-1"
    client.user(erin)
    assert client.pass_(password).startswith(f"+OK {erin} has 0 messages".encode())
    client.quit()


def test_noApop(shared):
    """
    With C{--no-apop} the greeting has no timestamp, so a client does not
    even try APOP; and APOP sent anyway is refused.
    """
    server = shared("--no-apop", *FAST_FAILURES)
    mailgate_cli = shared.cli(server)
    bob = shared.address("bob")
    mailgate_cli.addUser(bob, BOB_PW, apop=True)
    client = pop(server)
    welcome = client.getwelcome()
    assert welcome.startswith(b"+OK")
    assert not re.search(rb"<.*>", welcome), welcome
    with pytest.raises(poplib.error_proto) as failure:
        client.apop(bob, BOB_PW)
    assert "APOP not supported" in str(failure.value)
    digest = hashlib.md5(b"<1.2@mailgate.test>" + BOB_PW.encode()).hexdigest()
    with pytest.raises(poplib.error_proto) as failure:
        client._shortcmd(f"APOP {bob} {digest}")
    assert failure.value.args[0].startswith(b"-ERR")
    client.user(bob)
    assert client.pass_(BOB_PW).startswith(b"+OK")
    client.quit()


# -- 3. byte-exact RETR --------------------------------------------------

AWKWARD = crlf(
    b"From: dots@example.net\n"
    b"Subject: awkward lines\n"
    b"\n"
    b".starts with a dot\n"
    b"..starts with two dots\n"
    b".\n"
    b"the line above is a single dot\n"
    b"\n"
    + b"L" * 5000 + b"\n"
    + bytes(range(0x80, 0x100)) + b"\n"
    b" .space then dot\n"
    b"..\n"
    b"last line\n"
)


def _chunkBoundaryMessage():
    """
    A message larger than two storage chunks, built so that a line starting
    with "." begins exactly at the first chunk boundary and a CRLF is split
    across the second: dot-stuffing must not depend on how the message is
    cut for streaming.
    """
    try:
        from mailgate.store.sql import CHUNK_SIZE
    except ImportError:
        CHUNK_SIZE = 128 * 1024
    head = b"Subject: chunks\r\n\r\n"
    lines = []
    size = len(head)
    n = 0
    while size < CHUNK_SIZE - 200:
        line = (b"." if n % 3 == 0 else b"") + b"line %d " % n + b"x" * (n % 61) + b"\r\n"
        lines.append(line)
        size += len(line)
        n += 1
    filler = CHUNK_SIZE - size - 2
    lines.append(b"f" * filler + b"\r\n")
    lines.append(b".at the first chunk boundary\r\n")
    size = CHUNK_SIZE + len(lines[-1])
    # The \r of this line is the last octet of the second chunk.
    lines.append(b"y" * (2 * CHUNK_SIZE - size - 1) + b"\r\n")
    lines.append(b".after the second chunk boundary\r\n")
    lines.append(b"..\r\n.\r\nend\r\n")
    data = head + b"".join(lines)
    assert data[CHUNK_SIZE:CHUNK_SIZE + 1] == b"."
    assert data[2 * CHUNK_SIZE - 1:2 * CHUNK_SIZE + 1] == b"\r\n"
    return data


def test_retrIsByteExact(shared, monkeypatch):
    """
    RETR gives back exactly the octets delivered (with CRLF line ends):
    dot-stuffed on the wire, un-stuffed by the client, with the sizes the
    client counts.
    """
    server = shared(*FAST_FAILURES)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    # poplib refuses lines over 2048 octets; POP3 itself has no such limit
    # for message lines, and this test sends a 5000-octet one.
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)
    big = _chunkBoundaryMessage()
    mailgate_cli.addUser(alice, ALICE_PW)
    # Delivered with LF line ends (as an MTA pipes it) and with CRLF.
    mailgate_cli.deliver(alice, AWKWARD.replace(b"\r\n", b"\n"))
    mailgate_cli.deliver(alice, big)
    expected = [AWKWARD, big]
    assert [row[1] for row in mailgate_cli.mailbox(alice)] == [len(m) for m in expected]

    client = login(server, alice, ALICE_PW)
    assert client.stat() == (2, sum(map(len, expected)))
    assert client.list()[1] == [b"%d %d" % (i + 1, len(m)) for i, m in enumerate(expected)]
    for number, sent in enumerate(expected, 1):
        assert client.list(number) == b"+OK %d %d" % (number, len(sent))
        status, lines, octets = client.retr(number)
        assert octetsIn(status) == len(sent)
        assert lines == sent.split(b"\r\n")[:-1]
        assert octets == len(sent)
    client.quit()

    # The same on the wire, without a client library in between.
    with connect(server.port) as sock:
        reader = LineReader(sock)
        assert reader.line().startswith(b"+OK")
        sock.sendall(f"USER {alice}\r\nPASS {ALICE_PW}\r\n".encode())
        assert reader.line().startswith(b"+OK")
        assert reader.line().startswith(b"+OK")
        for number, sent in enumerate(expected, 1):
            sock.sendall(b"RETR %d\r\n" % number)
            status = reader.line()
            assert octetsIn(status) == len(sent)
            assert reader.multiline() == dotStuffed(sent)
        sock.sendall(b"QUIT\r\n")
        assert reader.line().startswith(b"+OK")


# -- 4. DELE, QUIT and dropped connections -------------------------------


def test_deleteAndQuitRemoves_dropKeeps(shared):
    """
    Messages marked with DELE are removed by QUIT, and only by QUIT: a
    session whose connection drops removes nothing.
    """
    server = shared(*FAST_FAILURES)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    mailgate_cli.addUser(alice, ALICE_PW)
    uids = [mailgate_cli.deliver(alice, message(f"m{i}")) for i in range(3)]

    client = login(server, alice, ALICE_PW)
    client.dele(2)
    assert client.stat()[0] == 2
    assert client.quit().startswith(b"+OK")
    assert [row[2] for row in mailgate_cli.mailbox(alice)] == [uids[0], uids[2]]

    client = login(server, alice, ALICE_PW)
    assert [line.split()[1] for line in client.uidl()[1]] == [uids[0].encode(), uids[2].encode()]
    assert client.dele(1).startswith(b"+OK")
    assert client.dele(2).startswith(b"+OK")
    assert client.stat() == (0, 0)
    client.close()  # no QUIT: the socket just goes away

    assert [row[2] for row in mailgate_cli.mailbox(alice)] == [uids[0], uids[2]]
    client = retryLogin(server, alice, ALICE_PW)
    assert [line.split()[1] for line in client.uidl()[1]] == [uids[0].encode(), uids[2].encode()]
    client.quit()
    assert [row[2] for row in mailgate_cli.mailbox(alice)] == [uids[0], uids[2]]


# -- 5. one session per maildrop -----------------------------------------


def test_secondSessionIsRefusedUntilTheFirstEnds(shared):
    server = shared(*FAST_FAILURES)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    mailgate_cli.addUser(alice, ALICE_PW)
    mailgate_cli.deliver(alice, message("locked"))

    first = login(server, alice, ALICE_PW)
    second = pop(server)
    second.user(alice)
    with pytest.raises(poplib.error_proto) as failure:
        second.pass_(ALICE_PW)
    assert failure.value.args[0].startswith(b"-ERR [IN-USE]")
    # The refused session is still usable and still locked out.
    second.user(alice)
    with pytest.raises(poplib.error_proto) as failure:
        second.pass_(ALICE_PW)
    assert failure.value.args[0].startswith(b"-ERR [IN-USE]")
    assert first.stat()[0] == 1  # the first session is unaffected

    # QUIT answers +OK once the session is over: the next login works.
    assert first.quit().startswith(b"+OK")
    second.user(alice)
    assert second.pass_(ALICE_PW).startswith(b"+OK")

    # An abrupt close releases the lock too, once the server notices.
    third = pop(server)
    third.user(alice)
    with pytest.raises(poplib.error_proto) as failure:
        third.pass_(ALICE_PW)
    assert failure.value.args[0].startswith(b"-ERR [IN-USE]")
    third.close()
    second.sock.shutdown(socket.SHUT_RDWR)
    second.close()
    client = retryLogin(server, alice, ALICE_PW)
    assert client.stat()[0] == 1
    client.quit()


# -- 6. unique ids -------------------------------------------------------


def assertCleanShutdown(server):
    """
    SIGTERM stops the server cleanly.  twistd ends by re-raising the signal
    it stopped on, so the status is 0 or "killed by SIGTERM".
    """
    assert server.stop() in (0, -signal.SIGTERM), server.log()
    assert "Server Shut Down." in server.stdout, server.log()


def uidl(client):
    return {int(n): uid.decode() for n, uid in (line.split() for line in client.uidl()[1])}


def test_uniqueIdsSurviveRestartAndAreNotReused(mailgate_server, mailgate_cli):
    mailgate_cli.addUser(ALICE, ALICE_PW)
    mailgate_cli.addUser(BOB, BOB_PW)
    delivered = [mailgate_cli.deliver(ALICE, message(f"m{i}")) for i in range(4)]
    assert len(set(delivered)) == 4

    server = mailgate_server()
    client = login(server, ALICE, ALICE_PW)
    before = uidl(client)
    assert before == {i + 1: uid for i, uid in enumerate(delivered)}
    client.quit()
    assertCleanShutdown(server)

    server = mailgate_server()
    client = login(server, ALICE, ALICE_PW)
    assert uidl(client) == before
    # Delete the newest message (the one an id counter would hand out
    # again) and one in the middle.
    client.dele(4)
    client.dele(2)
    assert client.quit().startswith(b"+OK")
    assertCleanShutdown(server)

    server = mailgate_server()
    fresh = mailgate_cli.deliver(ALICE, message("new"))
    other = mailgate_cli.deliver(BOB, message("for bob"))
    assert fresh not in delivered
    client = login(server, ALICE, ALICE_PW)
    assert uidl(client) == {1: delivered[0], 2: delivered[2], 3: fresh}
    client.quit()
    client = login(server, BOB, BOB_PW)
    assert uidl(client) == {1: other}
    client.quit()


# -- 7. the twistd plugin after a non-editable install -------------------


def test_pluginIsInstalled():
    code, out, err = runCommand([TWISTD, "--help"])
    assert code == 0, err
    assert re.search(r"^\s+mailgate\s", out, re.M), out

    code, out, err = runCommand([TWISTD, "mailgate", "--help"])
    assert code == 0, err
    for option in ("--database", "--pop3", "--hostname", "--no-apop", "--auth-failure-delay"):
        assert option in out, (option, out)
    assert "Traceback" not in err


def test_wheelShipsThePluginButNoNamespaceInit(tmp_path):
    """
    The wheel carries twisted/plugins/mailgate_plugin.py and no
    twisted/__init__.py or twisted/plugins/__init__.py, which would shadow
    Twisted itself once installed.

    It is built from a copy of the working tree, so that setuptools' build/
    and egg-info directories never appear in (or race with) the repository.
    """
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".pgtest", "build", "dist", "*.egg-info", ".pytest_cache", "__pycache__"
        ),
    )
    wheels = tmp_path / "wheels"
    code, out, err = runCommand(
        [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
            "--no-build-isolation", "-w", str(wheels), str(source),
        ],
        timeout=120,
    )
    assert code == 0, err
    [wheel] = wheels.glob("mailgate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/mailgate_plugin.py" in names, names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "mailgate/pop3/protocol.py" in names


# -- 8. start-up errors --------------------------------------------------


def assertOneLineError(server, *expected):
    code = server.wait()
    assert code != 0, server.log()
    output = server.stdout + server.stderr
    assert "Traceback" not in output, server.log()
    errors = [line for line in server.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, server.log()
    assert errors[0].startswith("mailgate: "), server.log()
    for text in expected:
        assert text in errors[0], server.log()
    return errors[0]


@sqliteOnly
def test_databaseThatCannotBeOpened(mailgate_server):
    server = mailgate_server.spawn(database="sqlite:////nonexistent-dir/x.sqlite3")
    assertOneLineError(server, "/nonexistent-dir/x.sqlite3")


@sqliteOnly
def test_portInUse(mailgate_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = mailgate_server.spawn("--pop3", f"tcp:{port}:interface=127.0.0.1", listen=False)
        assertOneLineError(server, str(port))


def _daemonOnAPortInUse(tmp_path, *options):
    """
    Start a daemonized twistd mailgate (no -n) whose POP3 port another
    socket holds, with C{options}, and wait for its parent to exit (it
    reports what the daemon tells it through a status pipe).

    @return: C{(exit status, standard output, standard error, the log
        file, the port)}.
    """
    pidfile = tmp_path / "twistd.pid"
    logfile = tmp_path / "twistd.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        argv = [
            TWISTD, "--pidfile", str(pidfile), "--logfile", str(logfile), "mailgate",
            "--database", databaseURL(tmp_path / "mail.sqlite3"), "--hostname", "mailgate.test",
            "--pop3", f"tcp:{port}:interface=127.0.0.1", *options,
        ]
        try:
            code, out, err = runCommand(argv, cwd=tmp_path)
        except pytest.fail.Exception as e:
            log = logfile.read_text() if logfile.exists() else "(no log file)"
            pytest.fail(f"twistd (daemon mode) did not exit after a failed start-up: {e}\n"
                        f"--- {logfile.name} ---\n{log}")
        finally:
            # Should start-up ever succeed, do not leave a daemon behind.
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
                except (ValueError, ProcessLookupError):
                    pass
    return code, out, err, logfile, port


def test_portInUse_daemon(tmp_path):
    """
    The same without -n: twistd daemonizes, and its parent process must
    still end with the error and a non-zero status (it reports what the
    daemon tells it through a status pipe) rather than wait forever.
    """
    code, out, err, logfile, port = _daemonOnAPortInUse(tmp_path)
    assert code != 0
    assert "Traceback" not in err
    # The whole reason, not the 100 octets twistd's parent is handed.
    assert f"mailgate: cannot listen for POP3 on tcp:{port}:interface=127.0.0.1: " in err, err
    assert "Address already in use" in err, err
    # And the log says it in one line of its own (before twistd's traceback).
    assert f"[mailgate.service.MailgateService#error] mailgate: cannot listen for POP3 on tcp:{port}" in (
        logfile.read_text()
    )


def test_portInUse_daemonWithAJSONLog(tmp_path):
    """
    A daemonized twistd with --log-format json: its log file is JSON line
    by line, and the traceback of the failed start is one record (its
    traceback field), after the start's own line.  Python printed it,
    onto standard error, which twistd points at the log, so that each of
    its fifty-odd lines was a record of its own (event stderr).
    """
    import json

    code, out, err, logfile, port = _daemonOnAPortInUse(tmp_path, "--log-format", "json")
    assert code != 0
    records = [json.loads(line) for line in logfile.read_text().splitlines()]
    events = [r["event"] for r in records]
    assert "stderr" not in events, events
    assert events.count("service.start_failed") == 1, events
    [traceback] = [r for r in records if r["event"] == "service.start_traceback"]
    assert events.index("service.start_failed") < events.index("service.start_traceback")
    assert traceback["level"] == "error"
    assert "CannotListenError" in traceback["traceback"] and "Address already in use" in traceback["traceback"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start twistd as the unprivileged user nobody")
def test_aPortRefusedForWantOfPrivilegeIsAConfigurationError(request):
    """
    Under systemd, exit 78 leaves the unit failed with its reason
    (RestartPreventExitStatus=78) where exit 1 is retried: a port below
    1024 that the user may not bind (no CAP_NET_BIND_SERVICE) cannot work
    on a retry, and is 78; a port still in use (the process before, not
    yet gone) may, and stays 1.
    """
    import subprocess
    import tempfile

    from e2e import DEADLINE, TWISTD, childEnvironment

    # A directory nobody may write in (pytest's own are root's alone).
    shared = Path(tempfile.mkdtemp(prefix="mailgate-nobody-"))
    shared.chmod(0o777)
    database = databaseURL(shared / "mail.sqlite3")

    def start(endpoint, user=None):
        argv = [TWISTD, "-n", "--pidfile=", "mailgate", "--database", database, "--pop3", endpoint]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=DEADLINE, cwd=shared, env=childEnvironment(),
            user=user,
        )
        return done.returncode, done.stderr

    request.addfinalizer(lambda: shutil.rmtree(shared, ignore_errors=True))

    code, err = start("tcp:1:interface=127.0.0.1", user="nobody")
    assert code == 78, err
    assert "mailgate: cannot listen for POP3 on tcp:1:interface=127.0.0.1: " in err and "Permission denied" in err
    assert "Traceback" not in err
    # A Unix socket in a directory the user may not write (Postfix's queue
    # directory, say), with Twisted's lock file (the default) or without:
    # 78 both ways.  With the lock file, whose making fails first, it was 1,
    # and systemd started the server again every two seconds for ever.
    private = shared / "private"
    private.mkdir(mode=0o755)
    for options in ("", ":lockfile=0"):
        endpoint = f"unix:{private / 'pop3'}{options}"
        code, err = start(endpoint, user="nobody")
        assert code == 78, (endpoint, err)
        assert f"mailgate: cannot listen for POP3 on {endpoint}: " in err and "Permission denied" in err
    # A Unix socket in a directory that does not exist (no RuntimeDirectory=
    # makes it): 78 too, in plain words, where it was 1 and the lock's bare
    # "[Errno 2] No such file or directory: 'PID' -> b'....lock'".
    missing = shared / "run" / "mailgate"
    code, err = start(f"unix:{missing / 'pop3'}")
    assert code == 78, err
    assert f"cannot make the socket's lock file {missing / 'pop3'}.lock: No such file or directory" in err, err
    assert f"the directory {missing} does not exist" in err and "Traceback" not in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        code, err = start(f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1")
    assert code == 1 and "Address already in use" in err, err


@sqliteOnly
def test_secondServerOnTheSameDatabase(mailgate_server, mailgate_cli):
    mailgate_cli.addUser(ALICE, ALICE_PW)
    first = mailgate_server()
    second = mailgate_server.spawn()
    line = assertOneLineError(second, "in use by another mailgate server")
    assert "mail.sqlite3" in line
    # The first server is not disturbed.
    assert first.running()
    client = login(first, ALICE, ALICE_PW)
    assert client.stat() == (0, 0)
    client.quit()


# -- 9. pipelining -------------------------------------------------------


@sqliteOnly
def test_aClientThatDoesNotLogInInTimeIsDisconnected(mailgate_server, mailgate_cli):
    """
    --login-timeout: a client that has not logged in two seconds after
    the greeting (it sent CAPA meanwhile) gets -ERR and the connection
    closes, and the log says why; one that logged in in time is not cut
    off.

    The client that logs in was greeted first, so its login timer was due
    before the other's: once the other is cut off, it would have been too,
    without the test sleeping for it.  Two seconds leave a slow machine
    ample time for a USER/PASS with its password hash (about 0.1 s).
    """
    mailgate_cli.addUser(ALICE, ALICE_PW)
    server = mailgate_server("--login-timeout", "2")
    client = login(server, ALICE, ALICE_PW)
    with connect(server.port) as sock:
        reader = LineReader(sock)
        assert reader.line().startswith(b"+OK")
        sock.sendall(b"CAPA\r\n")
        assert reader.line() == b"+OK capability list follows\r\n"
        while reader.line() != b".\r\n":
            pass
        # Read within the socket's timeout (DEADLINE), which the two
        # seconds of the login timeout are well inside.
        assert reader.line() == b"-ERR no login within 2 seconds; closing the connection\r\n"
        with pytest.raises(EOFError):
            reader.line()
    waitFor(lambda: "pop3 login timeout" in server.stdout, "the login timeout to be logged")

    assert client.stat() == (0, 0)
    client.quit()


def test_pipeliningOverARealSocket(shared):
    server = shared(*FAST_FAILURES)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    mailgate_cli.addUser(alice, ALICE_PW)
    sent = crlf(message("pipelined", b".dot\nbody\n"))
    uid = mailgate_cli.deliver(alice, sent)
    with connect(server.port) as sock:
        reader = LineReader(sock)
        assert reader.line().startswith(b"+OK")
        sock.sendall(
            f"USER {alice}\r\nPASS {ALICE_PW}\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nQUIT\r\n".encode()
        )
        assert reader.line().startswith(b"+OK")  # USER
        assert reader.line().startswith(b"+OK")  # PASS
        assert reader.line() == b"+OK 1 %d\r\n" % len(sent)  # STAT
        assert reader.line().startswith(b"+OK")  # LIST
        assert reader.multiline() == b"1 %d\r\n.\r\n" % len(sent)
        assert reader.line().startswith(b"+OK")  # UIDL
        assert reader.multiline() == b"1 %s\r\n.\r\n" % uid.encode()
        assert octetsIn(reader.line()) == len(sent)  # RETR
        assert reader.multiline() == dotStuffed(sent)
        assert reader.line().startswith(b"+OK")  # QUIT
        assert reader.closed()
    assert len(mailgate_cli.mailbox(alice)) == 1


# -- 10. curl ------------------------------------------------------------


CURL = shutil.which("curl")
needsCurl = pytest.mark.skipif(CURL is None, reason="curl is not installed (no curl on PATH)")


def curl(server, address, password, path, loginOptions=None):
    argv = [CURL, "-s", "-S", "--max-time", "15", "-u", f"{address}:{password}"]
    if loginOptions:
        argv += ["--login-options", loginOptions]
    return runCommand(argv + [f"pop3://127.0.0.1:{server.port}{path}"])


@needsCurl
@pytest.mark.parametrize(
    "options, apop, loginOptions",
    [(("--no-apop",), False, None), ((), True, "AUTH=+APOP")],
    ids=["no-apop-server", "APOP-forced"],
)
def test_curl(shared, options, apop, loginOptions):
    """
    curl fetches (un-stuffing dots) and lists messages.  curl chooses how
    to log in by itself (SASL if CAPA offers it, else APOP if the greeting
    offers it, else USER/PASS); the second case makes it use APOP.
    """
    server = shared(*options, *FAST_FAILURES, prepare=withAnAPOPUser if apop else None)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    mailgate_cli.addUser(alice, ALICE_PW, apop=apop)
    first = crlf(message("for curl", b".dot\n..two dots\n.\nHello from mailgate.\n"))
    second = crlf(message("second"))
    mailgate_cli.deliver(alice, first)
    mailgate_cli.deliver(alice, second)

    code, out, err = curl(server, alice, ALICE_PW, "/1", loginOptions)
    assert code == 0, err
    assert out.encode() == first

    code, out, err = curl(server, alice, ALICE_PW, "/", loginOptions)
    assert code == 0, err
    assert out.splitlines() == [f"1 {len(first)}", f"2 {len(second)}"]

    code, out, err = curl(server, alice, "wrong", "/1", loginOptions)
    assert code == 67, (code, out, err)  # CURLE_LOGIN_DENIED
    # Nothing was deleted by any of this.
    assert len(mailgate_cli.mailbox(alice)) == 2


@needsCurl
def test_curlAsInTheReadmeQuickStart(shared):
    """
    The README's quick start: a server with default options, a user added
    with `mailgate user add` (no --apop), and `curl -u ADDRESS
    pop3://.../1`.  curl prefers APOP to USER/PASS whenever the greeting
    carries a timestamp (and never falls back), so this works only if the
    default server offers curl a way in that it prefers to APOP (SASL) or
    does not offer APOP to a maildrop that cannot use it.
    """
    server = shared(*FAST_FAILURES)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    mailgate_cli.addUser(alice, ALICE_PW)
    sent = crlf(message("hello", b"first message\n"))
    mailgate_cli.deliver(alice, sent)
    code, out, err = curl(server, alice, ALICE_PW, "/1")
    assert code == 0, f"curl exited {code}: {err}"
    assert out.encode() == sent


# -- 11. an endless line -------------------------------------------------


def test_megabyteLineWithoutLineEnd(shared):
    """
    A 1 MB "command" is discarded as it arrives: the session gets -ERR once
    the line ends and goes on, and other clients are served meanwhile.
    """
    server = shared(*FAST_FAILURES)
    mailgate_cli = shared.cli(server)
    alice = shared.address("alice")
    bob = shared.address("bob")
    mailgate_cli.addUser(alice, ALICE_PW)
    mailgate_cli.addUser(bob, BOB_PW)
    mailgate_cli.deliver(bob, message("still here"))
    with connect(server.port) as sock:
        reader = LineReader(sock)
        assert reader.line().startswith(b"+OK")
        sock.sendall(b"USER " + b"x" * (1 << 20))

        # Meanwhile, another client is served.
        client = login(server, bob, BOB_PW)
        assert client.stat()[0] == 1
        assert client.quit().startswith(b"+OK")

        sock.sendall(b"\r\n")
        reply = reader.line()
        assert reply.startswith(b"-ERR") and b"too long" in reply, reply
        # The session goes on.
        sock.sendall(f"USER {alice}\r\nPASS {ALICE_PW}\r\nSTAT\r\nQUIT\r\n".encode())
        assert reader.line().startswith(b"+OK")
        assert reader.line().startswith(b"+OK")
        assert reader.line() == b"+OK 0 0\r\n"
        assert reader.line().startswith(b"+OK")
        assert reader.closed()
    assert server.running(), server.log()


@sqliteOnly
def test_theServerDumpsNoCore(mailgate_server):
    """
    A server started where core files are allowed (the test raises its
    own soft limit for the child to inherit, as an administrator's
    C{ulimit -c unlimited} would) sets its soft limit to 0: a core file
    would hold the passwords it checks in clear and the database URL's.
    The hard limit is left, for root to allow one again with prlimit.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if hard == 0:
        pytest.skip("core files are forbidden to this process's children already (hard limit 0)")
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    try:
        server = mailgate_server()
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    with open(f"/proc/{server.process.pid}/limits") as f:
        limits = [line.split() for line in f if line.startswith("Max core file size")]
    assert limits, "no core file size in /proc/PID/limits"
    assert limits[0][4] == "0", limits
    assert limits[0][5] == ("unlimited" if hard == resource.RLIM_INFINITY else str(hard)), limits
