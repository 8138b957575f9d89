"""
What a reload (SIGHUP) of a real C{twistd mailgate --config FILE} changes
for clients of the settings that waited for a restart until it applied
them, seen by real clients (smtplib, poplib, raw sockets, the metrics
endpoint, C{mailgate nodes}): the recipient delimiter, the reply to a
recipient over quota, SMTP's soft error limit, login-delay and the
credential cache apply to the recipients, error replies and logins that
come after the reload, the host name to the sessions opened after it,
and a node announces its new recipient delimiter to the nodes sharing
its database, which then agree with it again.

The command line gives the database and the listeners; the file, the
settings a test changes (tests/test_reload_policy.py's helpers).  Every
wait is bounded (L{DEADLINE}); no time is asserted, only that a reply
held for a minute has not come within a second.
"""

import poplib
import re
import smtplib

from test_e2e_harvest import nothingWithinASecond
from test_e2e_policy import ALICE, PASSWORD
from twisted.internet import defer
from twisted.internet.task import Clock as ReactorClock
from twisted.internet.testing import MemoryReactorClock
from test_metrics import sample, scrape
from test_reload_policy import configured, reload, writeConfig

from e2e import (  # noqa: F401 (mailgate_server, mailgate_cli are fixtures)
    DEADLINE,
    TWISTD,
    AdminCommand,
    ServerProcess,
    mailgate_cli,
    mailgate_server,
    postgresOnly,
    sqliteOnly,
    waitFor,
)
from mailgate.auth.cache import VerifiedCredentialCache
from mailgate.memory import MemoryTrimmer
from mailgate.tls import TicketKeyRotation

BOB = "bob@example.org"
SMTP = ("--smtp", "tcp:0:interface=127.0.0.1")


def smtpClient(server):
    client = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE)
    assert client.ehlo("client.test")[0] == 250
    return client


def rcpt(server, address):
    """
    The (code, text) of RCPT TO C{address} in a new SMTP session.
    """
    client = smtpClient(server)
    try:
        assert client.mail("sender@client.test")[0] == 250
        return client.rcpt(address)
    finally:
        client.quit()


def pop3(server):
    return poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)


def popLogin(server, address=ALICE):
    """
    The reply to PASS in a new POP3 session (then closed).
    """
    client = pop3(server)
    try:
        client.user(address)
        try:
            return client.pass_(PASSWORD)
        except poplib.error_proto as e:
            return e.args[0]
    finally:
        client.quit()


@sqliteOnly
def test_aRecipientDelimiterDeliversMailWithADetailToTheUser(mailgate_server, mailgate_cli, tmp_path):
    """
    Without a recipient delimiter bob+lists@ is no address here (550); a
    reload setting it to + delivers mail to bob+lists@ into bob's maildrop,
    and C{mailgate nodes} shows the node's new delimiter.  It had waited for
    the restart, while C{mailgate deliver} with the same file used it.
    """
    server, path = configured(mailgate_server, tmp_path, *SMTP)
    mailgate_cli.addUser(BOB, PASSWORD)
    code, text = rcpt(server, "bob+lists@example.org")
    assert code == 550, text
    writeConfig(path, recipient_delimiter='"+"')
    line = reload(server)
    client = smtpClient(server)
    try:
        message = b"Subject: a detail\r\n\r\nhi\r\n"
        assert client.sendmail("sender@client.test", ["bob+lists@example.org"], message) == {}
    finally:
        client.quit()
    client = pop3(server)
    try:
        client.user(BOB)
        client.pass_(PASSWORD)
        assert client.stat()[0] == 1
        assert any(b"Subject: a detail" == line for line in client.retr(1)[1])
    finally:
        client.quit()
    delimiterColumn = lambda: re.search(  # noqa: E731
        r"^\S+\[\d+\] .* none +\+ +\d+ ", mailgate_cli.check("nodes"), re.M
    )
    waitFor(delimiterColumn, "mailgate nodes to show the delimiter +")
    # ... and the log said so.
    assert "applied" in line and "recipient-delimiter" in line, server.log()


def node(mailgate_server, tmp_path, name, **settings):
    """
    A node with an SMTP listener, on the test's PostgreSQL schema, whose
    file (of its own) says C{settings}; the node and its file's path.
    """
    path = tmp_path / f"{name}.toml"
    writeConfig(path, **settings)
    server = mailgate_server("--config", str(path), "--hostname", f"{name}.test", *SMTP)
    return server, path


@postgresOnly
def test_nodesAgreeOnTheRecipientDelimiterOnceTheOtherIsReloaded(mailgate_server, tmp_path):
    """
    Node A takes bob+lists@ as bob's; node B, whose file did not say so,
    warns that the nodes differ in --recipient-delimiter.  B's file put
    right and reloaded, B says the nodes' settings are the same again (it
    announces and compares at once, not at its next heartbeat), and B
    takes the mail with a detail as A does.
    """
    a, _ = node(mailgate_server, tmp_path, "node-a", recipient_delimiter='"+"')
    waitFor(lambda: "node-a.test[" in " ".join(_nodeNames(a)), "node A's heartbeat")
    b, path = node(mailgate_server, tmp_path, "node-b")
    waitFor(
        lambda: re.search(r"--recipient-delimiter none here, \+ on node-a\.test\[\d+\]", b.log()),
        f"node B's warning\n{b.log()}",
    )
    assert "settings the same again" not in b.stdout
    writeConfig(path, recipient_delimiter='"+"')
    line = reload(b)
    waitFor(lambda: "nodes sharing the database: settings the same again" in b.stdout, f"node B agreeing\n{b.log()}")
    addUser(b, BOB)
    assert rcpt(b, "bob+lists@example.org")[0] == 250
    # ... and the log said so.
    assert "applied" in line and "recipient-delimiter" in line, b.log()


def _nodeNames(server):
    listed = AdminCommand(server.database).check("nodes")
    return [line.split()[0] for line in listed.splitlines()[1:] if line.strip()]


def addUser(server, address):
    AdminCommand(server.database).addUser(address, PASSWORD)


@sqliteOnly
def test_quotaExceededChangesTheReplyToARecipientOverQuota(mailgate_server, mailgate_cli, tmp_path):
    """
    alice, over her quota, is refused for now (452 4.2.2, the MTA retries);
    a reload setting quota-exceeded to permanent refuses her with 552 5.2.2
    (the MTA bounces) at the next RCPT.
    """
    server, path = configured(mailgate_server, tmp_path, *SMTP)
    mailgate_cli.addUser(ALICE, PASSWORD)
    mailgate_cli.deliver(ALICE, b"Subject: big\r\n\r\n" + b"x" * 4000 + b"\r\n")
    mailgate_cli.check("user", "quota", ALICE, "1K")
    code, text = rcpt(server, ALICE)
    assert (code, text.split()[0]) == (452, b"4.2.2"), text
    writeConfig(path, quota_exceeded='"permanent"')
    line = reload(server)
    code, text = rcpt(server, ALICE)
    assert (code, text.split()[0]) == (552, b"5.2.2"), text
    # ... and the log said so.
    assert "applied" in line and "quota-exceeded" in line, server.log()


@sqliteOnly
def test_aLowerSoftErrorLimitHoldsTheNextSessionsSecondError(mailgate_server, mailgate_cli, tmp_path):
    """
    With the default soft error limit (10) and error replies past it held
    a minute, a guesser's second unknown recipient is answered at once; a
    reload lowering smtp-soft-error-limit to 1 holds the second error
    reply of the next session: nothing has come a second later.
    """
    server, path = configured(mailgate_server, tmp_path, *SMTP, smtp_error_sleep_time="60")
    mailgate_cli.addUser(ALICE, PASSWORD)
    client = smtpClient(server)
    try:
        assert client.mail("sender@client.test")[0] == 250
        assert client.rcpt("nobody1@example.org")[0] == 550
        assert client.rcpt("nobody2@example.org")[0] == 550
    finally:
        client.quit()
    writeConfig(path, smtp_error_sleep_time="60", smtp_soft_error_limit="1")
    line = reload(server)
    client = smtpClient(server)
    try:
        assert client.mail("sender@client.test")[0] == 250
        assert client.rcpt("nobody1@example.org")[0] == 550
        client.send(b"RCPT TO:<nobody2@example.org>\r\n")
        nothingWithinASecond(client)
    finally:
        client.close()
    # ... and the log said so.
    assert "applied" in line and "smtp-soft-error-limit" in line, server.log()


@sqliteOnly
def test_loginDelayIsListedAndEnforcedAfterAReload(mailgate_server, mailgate_cli, tmp_path):
    """
    Without login-delay CAPA lists no LOGIN-DELAY and alice logs in as
    often as she likes; a reload setting it to 600 has the next session's
    CAPA list LOGIN-DELAY 600 (RFC 2449), and alice's second login within
    it refused with [LOGIN-DELAY].
    """
    server, path = configured(mailgate_server, tmp_path)
    mailgate_cli.addUser(ALICE, PASSWORD)
    client = pop3(server)
    try:
        assert "LOGIN-DELAY" not in client.capa()
    finally:
        client.quit()
    writeConfig(path, login_delay="600")
    line = reload(server)
    client = pop3(server)
    try:
        assert client.capa().get("LOGIN-DELAY") == ["600"]
    finally:
        client.quit()
    assert popLogin(server).startswith(b"+OK")
    assert popLogin(server).startswith(b"-ERR [LOGIN-DELAY]")
    # ... and the log said so.
    assert "applied" in line and "login-delay" in line, server.log()


@sqliteOnly
def test_aCredentialCacheTurnedOffIsEmptied(mailgate_server, mailgate_cli, tmp_path):
    """
    alice's second login is answered from the credential cache (a hit in
    mailgate_auth_cache_total); a reload setting auth-cache-size to 0 has
    her next login verified against the hash (a miss), and a reload
    turning the cache on again finds nothing remembered from before (a
    miss again, then a hit).
    """
    server, path = configured(mailgate_server, tmp_path, "--metrics", "tcp:0:interface=127.0.0.1")
    mailgate_cli.addUser(ALICE, PASSWORD)

    def counts():
        _, text = scrape(server)
        return tuple(sample(text, "mailgate_auth_cache_total", result=r) or 0 for r in ("hit", "miss"))

    def loginCounted():
        before = counts()
        assert popLogin(server).startswith(b"+OK")
        hits, misses = counts()
        return hits - before[0], misses - before[1]

    assert loginCounted() == (0, 1)
    assert loginCounted() == (1, 0)
    writeConfig(path, auth_cache_size="0")
    line = reload(server)
    assert loginCounted() == (0, 1)
    assert loginCounted() == (0, 1)
    writeConfig(path, auth_cache_size="100")
    reload(server)
    assert loginCounted() == (0, 1)
    assert loginCounted() == (1, 0)
    # ... and the log said so.
    assert "applied" in line and "auth-cache-size" in line, server.log()


# -- without sockets ----------------------------------------------------------


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_aReconfiguredCacheTrimsToItsBound():
    """
    L{VerifiedCredentialCache.reconfigure}: a lower bound drops the oldest
    entries (and failures) at once; 0 forgets all, and turned on again it
    has nothing from before.
    """
    clock = Clock()
    cache = VerifiedCredentialCache(maxEntries=10, lifetime=100.0, clock=clock)
    for n in range(3):
        cache.remember(f"u{n}@example.org", "hash", b"pw")
        cache.rememberFailure(f"u{n}@example.org", "hash", b"wrong")
    clock.now = 50.0
    assert cache.check("u0@example.org", "hash", b"pw")
    # u0, just used, is the latest; the oldest, u1, goes.
    cache.reconfigure(2, 100.0)
    assert len(cache) == 2
    assert not cache.check("u1@example.org", "hash", b"pw")
    assert cache.check("u0@example.org", "hash", b"pw")
    assert not cache.failedBefore("u0@example.org", "hash", b"wrong")
    assert cache.failedBefore("u2@example.org", "hash", b"wrong")
    cache.reconfigure(0, 100.0)
    assert len(cache) == 0
    cache.reconfigure(10, 100.0)
    assert not cache.check("u2@example.org", "hash", b"pw")
    assert not cache.failedBefore("u2@example.org", "hash", b"wrong")


def test_aReconfiguredLifetimeBoundsWhatIsRemembered():
    """
    A longer lifetime applies to what is remembered after it (an entry
    made before keeps its expiry); a shorter one also ends what was
    remembered before within it, as Dovecot's reload, which empties its
    cache, would: no login (or refusal) is honoured from memory for longer
    than the administrator now allows.
    """
    clock = Clock()
    cache = VerifiedCredentialCache(maxEntries=10, lifetime=100.0, clock=clock)
    cache.remember("old@example.org", "hash", b"pw")
    cache.rememberFailure("old@example.org", "hash", b"wrong")
    cache.reconfigure(10, 300.0)
    cache.remember("new@example.org", "hash", b"pw")
    clock.now = 150.0
    assert not cache.check("old@example.org", "hash", b"pw")
    assert cache.check("new@example.org", "hash", b"pw")

    cache.remember("old@example.org", "hash", b"pw")
    cache.rememberFailure("old@example.org", "hash", b"wrong")
    cache.reconfigure(10, 10.0)
    clock.now = 155.0
    assert cache.check("old@example.org", "hash", b"pw")
    assert cache.failedBefore("old@example.org", "hash", b"wrong")
    assert cache.check("new@example.org", "hash", b"pw")
    clock.now = 161.0
    assert not cache.check("old@example.org", "hash", b"pw")
    assert not cache.failedBefore("old@example.org", "hash", b"wrong")
    assert not cache.check("new@example.org", "hash", b"pw")


class FileServer(ServerProcess):
    """
    A server whose every setting comes from its configuration file (the
    host name too: the e2e servers' --hostname would override the file's).
    """

    def __init__(self, configPath, cwd):
        super().__init__(None, cwd=cwd, expect={"POP3": 1, "SMTP": 1})
        self.configPath = configPath

    @property
    def argv(self):
        return [TWISTD, "-n", "--pidfile=", "mailgate", "--config", str(self.configPath)]


def test_aNewHostNameNamesTheSessionsOpenedAfterTheReload(tmp_path):
    """
    A reload changing hostname from one.test to two.test: an SMTP session
    opened after it is greeted by two.test, and so named in its EHLO reply
    and the Received field of the mail it delivers, while one opened before
    keeps one.test to its end; C{mailgate nodes} shows the node as
    two.test.  It had waited for a restart, while mailgate deliver with the
    same file named two.test at once.
    """
    database = f"sqlite:///{tmp_path}/mail.sqlite3"
    path = tmp_path / "mailgate.toml"
    settings = (
        f'database = "{database}"\npop3 = ["tcp:0:interface=127.0.0.1"]\nsmtp = ["tcp:0:interface=127.0.0.1"]\n'
        'domain = ["example.org"]\nauth-failure-delay = 0\n'
    )
    path.write_text(settings + 'hostname = "one.test"\n')
    admin = AdminCommand(database)
    admin.addUser(BOB, PASSWORD)
    server = FileServer(path, tmp_path)
    try:
        server.start()
        before = smtpClient(server)
        try:
            assert before.ehlo_resp.decode().split()[0] == "one.test"
            path.write_text(settings + 'hostname = "two.test"\n')
            line = reload(server)
            after = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE)
            try:
                code, text = after.ehlo("client.test")
                assert text.decode().split()[0] == "two.test"
                assert after.sendmail("sender@client.test", [BOB], b"Subject: after\r\n\r\nhi\r\n") == {}
            finally:
                after.quit()
            code, text = before.ehlo("client.test")
            assert text.decode().split()[0] == "one.test"
            assert before.sendmail("sender@client.test", [BOB], b"Subject: before\r\n\r\nhi\r\n") == {}
        finally:
            before.quit()
        client = pop3(server)
        try:
            client.user(BOB)
            client.pass_(PASSWORD)
            received = {}
            for number in (1, 2):
                lines = client.retr(number)[1]
                subject = next(line for line in lines if line.startswith(b"Subject: "))
                received[subject] = b"\r\n".join(lines[: lines.index(b"")])
        finally:
            client.quit()
        assert b"by two.test" in received[b"Subject: after"], received
        assert b"by one.test" in received[b"Subject: before"], received
        waitFor(lambda: "two.test[" in admin.check("nodes"), "mailgate nodes to show two.test")
        # ... and the log said so.
        assert "applied" in line and "hostname" in line, server.log()
    finally:
        server.stop()


class _Ended:
    ended = 0


def test_aNewTrimIntervalTakesEffectFromTheReload():
    """
    L{MemoryTrimmer.setInterval}: lowered from an hour to 5 s, the next
    trim comes 5 s after the reload, not at the end of the hour, and the
    sessions that ended before it still count; 0 stops the trims, and a
    period set again starts them.
    """
    clock = ReactorClock()
    tracker = _Ended()
    trims = []
    trimmer = MemoryTrimmer(
        clock, tracker, interval=3600, trim=lambda: trims.append(clock.seconds()),
        inThread=lambda f: defer.maybeDeferred(f), resident=lambda: None,
    )
    trimmer.startService()
    tracker.ended = 1
    clock.advance(10)
    trimmer.setInterval(5)
    clock.advance(5)
    assert trims == [15]
    tracker.ended = 2
    trimmer.setInterval(0)
    clock.advance(3600)
    assert trims == [15]
    trimmer.setInterval(60)
    clock.advance(60)
    assert trims == [15, 3675]
    trimmer.stopService()


class _TLS:
    renewed = 0

    def ticketKeyRenewalProblem(self):
        return None

    def renewTicketKey(self):
        self.renewed += 1


def test_aNewTicketKeyRotationTakesEffectFromTheReload():
    """
    L{TicketKeyRotation.setInterval}: lowered from an hour to 60 s, the
    next key comes 60 s after the reload, then every 60 s.
    """
    clock = ReactorClock()
    tls = _TLS()
    rotation = TicketKeyRotation(tls, clock, 3600)
    rotation.startService()
    clock.advance(100)
    rotation.setInterval(60)
    clock.advance(59)
    assert tls.renewed == 0
    clock.advance(1)
    assert tls.renewed == 1
    clock.advance(60)
    assert tls.renewed == 2
    rotation.stopService()


def test_aReloadGivesTheTimersTheirNewPeriods(tmp_path):
    """
    A SIGHUP changing memory-trim-interval and tls-ticket-key-rotation says
    them applied, and the server's trimmer and ticket key rotation take
    the new periods (each shown at work above).
    """
    from certs import makeCertificate

    from mailgate.service import makeService
    from mailgate.tap import Options
    from mailgate.testing import memoryStore

    certificate, key = makeCertificate(tmp_path, "one.test")
    path = tmp_path / "mailgate.toml"
    path.write_text(f'tls-cert = "{certificate}"\ntls-key = "{key}"\n')
    options = Options()
    options.parseOptions(["--config", str(path)])
    root = makeService(options.toConfig(), reactor=MemoryReactorClock(), store=memoryStore())
    root.configSource = options.reread
    path.write_text(
        f'tls-cert = "{certificate}"\ntls-key = "{key}"\nmemory-trim-interval = 5\ntls-ticket-key-rotation = 60\n'
    )
    assert sorted(root.reloadConfig()) == ["memory-trim-interval", "tls-ticket-key-rotation"]
    [trimmer] = [s for s in root if isinstance(s, MemoryTrimmer)]
    [rotation] = [s for s in root if isinstance(s, TicketKeyRotation)]
    assert (trimmer.interval, rotation.interval) == (5, 60)
    assert root.restartNeeded == ()
