"""
What a reload (SIGHUP) of a real C{twistd mailgate --config FILE} changes
for clients, seen by real clients (poplib, smtplib, raw sockets bound to
127.0.0.2 and 127.0.0.3 to be several client addresses): the connection
limits, the ban threshold, the retention and quota defaults and the SMTP
and LMTP idle timeout of the file apply to what comes after the reload,
as Dovecot's C{doveadm reload} and C{postfix reload} apply theirs, where
each waited for a restart before (C{config.restart_needed}).  What is
under way keeps going: the connections open stay, the failures counted
before still count.

The command line gives the database and the listeners; the file, the
settings a test changes.  Every wait is bounded (L{DEADLINE}); no time is
asserted.
"""

import signal
import smtplib
import socket
import time

from test_e2e_policy import ALICE, PASSWORD, admitted, banned, failLogin, login, pop3Refused, rawConnection

from e2e import (  # noqa: F401 (mailgate_server, mailgate_cli are fixtures)
    DEADLINE,
    LineReader,
    mailgate_cli,
    mailgate_server,
    sqliteOnly,
    waitFor,
)
from mailgate.testing import addUser, deliver, memoryStore

FIRST = "127.0.0.2"
SECOND = "127.0.0.3"
BOB = "bob@example.org"

#: what every test's file says: no exempt network (loopback is, by
#: default), no delay to wait through after a failed login
BASE = {
    "exempt-network": '["none"]',
    "auth-failure-delay": "0",
    "auth-penalty-max": "0",
    "domain": '["example.org"]',
}


def writeConfig(path, **settings):
    """
    Write the file: L{BASE} and C{settings} (keys with C{_} for C{-}).
    """
    values = {**BASE, **{name.replace("_", "-"): value for name, value in settings.items()}}
    path.write_text("".join(f"{name} = {value}\n" for name, value in values.items()))


def configured(mailgate_server, tmp_path, *options, **settings):
    """
    A server on the test's database whose other settings come from a
    configuration file, and that file's path.
    """
    path = tmp_path / "mailgate.toml"
    writeConfig(path, **settings)
    return mailgate_server("--config", str(path), *options), path


def reload(server):
    """
    SIGHUP, and wait for the reload's C{configuration reloaded} line (or
    its failure's); return the line.
    """
    said = lambda: [line for line in server.stdout.splitlines() if "configuration reload" in line]  # noqa: E731
    before = len(said())
    server.process.send_signal(signal.SIGHUP)
    waitFor(lambda: len(said()) > before, f"the reload's line\n{server.log()}")
    return said()[before]


@sqliteOnly
def test_aLoweredLimitPerAddressRefusesTheNextConnection(mailgate_server, tmp_path):
    """
    Two POP3 connections from one address under max-connections-per-ip 3;
    lowered to 1 by a reload, the next from that address is refused (the
    two open ones go on), and another address gets one connection, not
    two.  The limit had waited for a restart: the third was greeted.
    """
    server, path = configured(mailgate_server, tmp_path, max_connections_per_ip="3")
    held = []
    try:
        for _ in range(2):
            sock, reader = rawConnection(server.port, FIRST)
            held.append((sock, reader))
            assert reader.line().startswith(b"+OK")
        writeConfig(path, max_connections_per_ip="1")
        line = reload(server)
        refused = pop3Refused(server, FIRST)
        assert refused == b"-ERR [SYS/TEMP] service temporarily unavailable: too many connections; try again later\r\n"
        # The connections open before the reload stay, and answer.
        for sock, reader in held:
            sock.sendall(b"CAPA\r\n")
            assert reader.line().startswith(b"+OK")
            reader.multiline()
        sock, reader = rawConnection(server.port, SECOND)
        held.append((sock, reader))
        assert reader.line().startswith(b"+OK")
        assert pop3Refused(server, SECOND) is not None
        assert "effect at the next restart" not in server.stdout
    finally:
        for sock, _ in held:
            sock.close()
    # ... and the log said so.
    assert "applied" in line and "max-connections-per-ip" in line, server.log()


def test_aLoweredBanThresholdBansAfterFewerFailures(mailgate_server, mailgate_cli, tmp_path):
    """
    One failed login from an address under ban-after 10; lowered to 2 by a
    reload, the address's next failure bans it (the failure before the
    reload still counts): its next connection is refused, while another
    address logs in.  On both backends, where the store decides a ban
    from the threshold the node gives it.
    """
    server, path = configured(mailgate_server, tmp_path, ban_after="10")
    mailgate_cli.addUser(ALICE, PASSWORD)
    failLogin(server, FIRST)
    assert admitted(server, FIRST)
    writeConfig(path, ban_after="2")
    line = reload(server)
    failLogin(server, FIRST)
    assert banned(server, FIRST)
    login(server, SECOND).quit()
    [row] = [r for r in mailgate_cli.check("ban", "list").splitlines()[1:] if r.split()[0] == FIRST]
    assert row.split()[1:3] == ["auth-failures", "2"], row
    # ... and the log said so.
    assert "applied" in line and "ban-after" in line, server.log()


@sqliteOnly
def test_aShorterRetentionExpiresAtTheRetentionTasksNextRun(mailgate_server, tmp_path):
    """
    A maildrop holding a message three days old and one of today, under
    no retention; expire-days 2 by a reload: the retention task's next run
    (which the reload brings forward) removes the old one, keeps the new,
    and POP3's CAPA says EXPIRE 2.  It had waited for a restart.
    """
    store = memoryStore(f"sqlite:///{tmp_path / 'mail.sqlite3'}")
    try:
        addUser(store, ALICE, PASSWORD)
        now = time.time()
        store._clock = lambda: now - 3 * 86400
        deliver(store, [ALICE], b"Subject: old\r\n\r\nthree days ago\r\n")
        store._clock = lambda: now
        deliver(store, [ALICE], b"Subject: new\r\n\r\ntoday\r\n")
    finally:
        store.close()
    server, path = configured(mailgate_server, tmp_path, expire_days='"never"')
    client = login(server, SECOND)
    assert client.stat()[0] == 2
    assert client.capa()["EXPIRE"] == ["NEVER"]
    client.quit()
    writeConfig(path, expire_days="2")
    line = reload(server)
    waitFor(lambda: "retention expired user=alice@example.org messages=1" in server.stdout,
            f"the retention task's run\n{server.log()}")
    client = login(server, SECOND)
    try:
        assert client.stat()[0] == 1
        assert client.capa()["EXPIRE"] == ["2"]
        assert b"today" in b"\n".join(client.retr(1)[1])
    finally:
        client.quit()
    # ... and the log said so.
    assert "applied" in line and "expire-days" in line, server.log()


@sqliteOnly
def test_aDefaultQuotaRefusesTheNextDelivery(mailgate_server, mailgate_cli, tmp_path):
    """
    Without a default quota, a 5000-octet message is taken for alice; a
    reload setting default-quota to 4K refuses the next at RCPT (552 5.2.3,
    larger than the whole quota), while bob, who has a quota of his own,
    still gets it.  It had waited for a restart (and a recipient the
    server remembered without a quota was answered from memory).
    """
    server, path = configured(mailgate_server, tmp_path, "--smtp", "tcp:0:interface=127.0.0.1")
    mailgate_cli.addUser(ALICE, PASSWORD)
    mailgate_cli.addUser(BOB, PASSWORD)
    mailgate_cli.check("user", "quota", BOB, "1M")

    def rcpt(address):
        client = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE)
        try:
            client.ehlo("client.test")
            assert client.mail("sender@client.test", ["SIZE=5000"])[0] == 250
            return client.rcpt(address)
        finally:
            client.quit()

    assert rcpt(ALICE)[0] == 250
    writeConfig(path, default_quota='"4K"')
    line = reload(server)
    code, text = rcpt(ALICE)
    assert (code, text.split()[0]) == (552, b"5.2.3"), text
    assert text.endswith(b"larger than the mailbox's whole quota (4096 octets)"), text
    assert rcpt(BOB)[0] == 250
    # ... and the log said so.
    assert "applied" in line and "default-quota" in line, server.log()


@sqliteOnly
def test_smtpIdleTimeoutReachesSMTPAndLMTPAtAReload(mailgate_server, tmp_path):
    """
    smtp-idle-timeout, set to 1 by a reload, closes the next SMTP and LMTP
    sessions left silent (421 4.4.2), while one opened before the reload
    keeps the five minutes it began with.  The setting did not exist:
    SMTP's timeout was five minutes whatever the file said.
    """
    server, path = configured(
        mailgate_server, tmp_path, "--smtp", "tcp:0:interface=127.0.0.1", "--lmtp", "tcp:0:interface=127.0.0.1"
    )
    early = smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE)
    try:
        writeConfig(path, smtp_idle_timeout="1")
        line = reload(server)
        for name in ("SMTP", "LMTP"):
            sock = socket.create_connection(("127.0.0.1", server.portOf(name)), DEADLINE)
            try:
                reader = LineReader(sock)
                assert reader.line().startswith(b"220")
                # Silent: the server speaks next, and hangs up.
                reply = reader.line()
                assert reply.startswith(b"421 4.4.2"), reply
                assert reader.closed()
            finally:
                sock.close()
        assert early.noop()[0] == 250
    finally:
        early.quit()
    # ... and the log said so, with less than RFC 5321 asks warned of.
    assert "applied" in line and "smtp-idle-timeout" in line, server.log()
    assert "smtp-idle-timeout 1 is under the 300 seconds RFC 5321" in server.stdout


# -- without sockets ----------------------------------------------------------


def _policy(**settings):
    from twisted.internet.task import Clock

    from mailgate.policy.connection import ConnectionPolicy
    from mailgate.policy.memory import MemoryPolicyStore
    from mailgate.policy.settings import PolicySettings

    settings = PolicySettings(**settings)
    return ConnectionPolicy(MemoryPolicyStore(), Clock(), settings), settings


def _peer(port, host="192.0.2.7"):
    from twisted.internet.address import IPv4Address

    return IPv4Address("TCP", host, port)


def test_connectionsAreUncountedAsTheyWereCountedAcrossAReload():
    """
    Two connections admitted from an exempt network are not counted per
    address; once a reload takes the exemption away, the next from that
    address counts, and the limit of one refuses another; the two exempt
    ones closing do not uncount it (which would let a further one in).
    """
    import attr

    from mailgate.policy.connection import TOO_MANY

    policy, settings = _policy(maxConnectionsPerAddress=1, exemptNetworks=["192.0.2.0/24"])
    exempt = [_peer(1000), _peer(1001)]
    assert [policy.admit("pop3", peer) for peer in exempt] == [None, None]
    policy.reconfigure(attr.evolve(settings, exemptNetworks=["none"]))
    assert policy.admit("pop3", _peer(1002)) is None
    assert policy.admit("pop3", _peer(1003)) == TOO_MANY
    for peer in exempt:
        policy.connectionClosing("pop3", peer)
        policy.connectionClosed("pop3", peer)
    assert policy.admit("pop3", _peer(1004)) == TOO_MANY
    policy.connectionClosing("pop3", _peer(1002))
    policy.connectionClosed("pop3", _peer(1002))
    assert policy.admit("pop3", _peer(1005)) is None
    assert policy.limits.total == 1


def test_aLowerLimitInAllPutsTheServerUnderStressAtOnce():
    """
    Six connections of at most ten are no stress; a reload lowering the
    limit to seven is (six is past 80% of it): idle sessions are closed
    sooner from then on.  Back to ten, the stress is over (six is under
    70% of it).
    """
    import attr

    policy, settings = _policy(maxConnections=10, exemptNetworks=["none"])
    for port in range(6):
        assert policy.admit("pop3", _peer(port, f"198.51.100.{port}")) is None
    assert not policy.underStress()
    policy.reconfigure(attr.evolve(settings, maxConnections=7))
    assert policy.underStress()
    policy.reconfigure(settings)
    assert not policy.underStress()


def test_aReloadedBanThresholdBansAtTheNextFailure():
    """
    Failures counted under ban-after 10 still count once a reload lowers
    it to 3: the third failure bans, for the new ban-time.
    """
    import attr

    policy, settings = _policy(banAfter=10, exemptNetworks=["none"])
    for n in range(2):
        policy.authenticationFailed(_peer(n), "alice@example.org", f"guess {n}")
    assert not policy.isBanned(_peer(9))
    policy.reconfigure(attr.evolve(settings, banAfter=3, banTime=60))
    policy.authenticationFailed(_peer(3), "alice@example.org", "guess 3")
    assert policy.isBanned(_peer(9))
    ban = policy.bans.get("192.0.2.7")
    assert (ban.failures, ban.expires - ban.created) == (3, 60)


def test_aReloadedProxyNetworkIsBelievedFromTheNextConnection():
    """
    The balancers a haproxy: listener believes change with proxy-network
    at a reload, for the factory it already listens with.
    """
    import ipaddress

    from twisted.internet.task import Clock

    from mailgate.session.proxy import ProxyHeaderEndpoint, isBalancer

    class Wrapped:
        def listen(self, factory):
            self.factory = factory

    wrapped = Wrapped()
    endpoint = ProxyHeaderEndpoint(Clock(), wrapped, ["127.0.0.0/8"])
    endpoint.listen(object())
    balancer = _peer(1, "10.0.0.2")
    assert not isBalancer(balancer, wrapped.factory.balancers)
    endpoint.setBalancers(["10.0.0.2/32"])
    assert isBalancer(balancer, wrapped.factory.balancers)
    assert wrapped.factory.balancers == (ipaddress.ip_network("10.0.0.2/32"),)


def test_aReloadBringsTheRetentionTasksNextRoundForward():
    """
    L{RetentionService.runSoon} (a reload changed the retention defaults)
    runs the next round at once rather than up to ten minutes later; while
    a round is under way (which may have passed what the new defaults
    remove), once it ends; then the rounds keep their interval.
    """
    from twisted.internet import defer
    from twisted.internet.testing import MemoryReactorClock

    from mailgate.store.housekeeping import RetentionService

    class Store:
        class sessions:
            clockAhead = False

        class retention:
            @staticmethod
            def refresh():
                return defer.succeed(None)

        rounds = []

        def expireMessages(self, users, messages):
            self.rounds.append(defer.Deferred())
            return self.rounds[-1]

        def purgeDeleted(self, messages):
            return defer.succeed(0)

    store = Store()
    reactor = MemoryReactorClock()
    service = RetentionService(store, reactor, interval=600)
    service.startService()
    reactor.run()
    try:
        service.runSoon()
        reactor.advance(0)
        assert len(store.rounds) == 1
        service.runSoon()
        store.rounds[0].callback((0, 0))
        reactor.advance(0)
        assert len(store.rounds) == 2
        store.rounds[1].callback((0, 0))
        reactor.advance(599)
        assert len(store.rounds) == 2
        reactor.advance(1)
        assert len(store.rounds) == 3
        store.rounds[2].callback((0, 0))
    finally:
        service.stopService()


def test_aCleartextNetworkNarrowedAsTLSIsTurnedOnWaitsForTheRestart(tmp_path):
    """
    A reload that turns TLS on (a restart's) and narrows
    smtp-cleartext-network leaves the networks to the restart too: the
    running server has no STARTTLS to offer the clients it would then
    refuse mail in the clear.  On a server with TLS, the same networks are
    applied: a new session from elsewhere must start TLS first.
    """
    from certs import makeCertificate
    from test_service import _reloadableService
    from twisted.internet.address import IPv4Address

    makeCertificate(tmp_path, "mail.test")
    tls = f'tls-cert = "{tmp_path}/mail.test.crt"\ntls-key = "{tmp_path}/mail.test.key"\n'
    narrowed = 'smtp-cleartext-network = ["192.0.2.0/24"]\n'
    client = IPv4Address("TCP", "198.51.100.7", 40000)

    path = tmp_path / "plain.toml"
    _, root = _reloadableService(path, "", "--smtp", "tcp:2525")
    path.write_text(tls + narrowed)
    assert root.reloadConfig() == []
    assert "smtp-cleartext-network" in root.restartNeeded
    assert root.listeners["SMTP"][0].factory.takesCleartext(client)

    path = tmp_path / "tls.toml"
    _, root = _reloadableService(path, tls, "--smtp", "tcp:2525")
    path.write_text(tls + narrowed)
    assert root.reloadConfig() == ["smtp-cleartext-network"]
    assert root.restartNeeded == ()
    assert not root.listeners["SMTP"][0].factory.takesCleartext(client)
