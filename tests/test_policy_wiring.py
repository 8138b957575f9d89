"""
The connection policy in C{twistd mailgate}: its options (tap.py), their
defaults, and how service.py builds it on the store and the reactor it is
given, hands it to the POP3, SMTP and LMTP factories, and runs its refresh
timer with the service.
"""

import time

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from iterated import IteratedReactor
from mailgate.errors import ConfigurationError
from mailgate.policy.connection import BANNED, ConnectionPolicy
from mailgate.pop3 import POP3Factory
from mailgate.service import MailgateConfig, makeService
from mailgate.session import OpenPolicy
from mailgate.smtp import SMTPFactory
from mailgate.store import openSynchronousStore
from mailgate.store.policy import SQLPolicyStore
from mailgate.tap import Options
from mailgate.testing import resultOf


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults():
    config = parse().toConfig()
    assert config.maxConnections == 5000
    assert config.maxConnectionsPerAddress == 50
    assert config.authPenaltyMax == 15
    assert config.banAfter == 10
    assert config.banWindow == 600
    assert config.banTime == 3600
    assert config.exemptNetworks == ["127.0.0.0/8", "::1/128"]
    assert MailgateConfig().exemptNetworks == ["127.0.0.0/8", "::1/128"]


def test_options():
    config = parse(
        "--max-connections", "100",
        "--max-connections-per-ip", "3",
        "--auth-penalty-max", "0",
        "--ban-after", "5",
        "--ban-window", "60",
        "--ban-time", "120",
        "--exempt-network", "10.0.0.0/8",
        "--exempt-network", "2001:db8::/32",
    ).toConfig()
    assert (config.maxConnections, config.maxConnectionsPerAddress) == (100, 3)
    assert config.authPenaltyMax == 0
    assert (config.banAfter, config.banWindow, config.banTime) == (5, 60, 120)
    # Giving the option replaces the default: loopback is not in it.
    assert config.exemptNetworks == ["10.0.0.0/8", "2001:db8::/32"]


def test_exemptNetworkNone():
    assert parse("--exempt-network", "none").toConfig().exemptNetworks == ["none"]


@pytest.mark.parametrize(
    "argv",
    [
        ("--exempt-network", "none", "--exempt-network", "10.0.0.0/8"),
        ("--exempt-network", "10.0.0.0/8", "--exempt-network", "none"),
        ("--exempt-network", "10.0.0.300/8"),
        ("--exempt-network", "example.org"),
        ("--max-connections", "-1"),
        ("--max-connections-per-ip", "many"),
        ("--auth-penalty-max", "-2"),
        ("--ban-after", "-1"),
        ("--ban-window", "0"),
        ("--ban-time", "0"),
    ],
)
def test_badOptions(argv):
    with pytest.raises(usage.UsageError):
        parse(*argv)


def config(tmp_path, **kw):
    kw.setdefault("database", f"sqlite:///{tmp_path / 'service.sqlite3'}")
    kw.setdefault("apop", True)
    return MailgateConfig(**kw)


def test_everyProtocolGetsThePolicy(tmp_path):
    reactor = MemoryReactorClock()
    root = makeService(
        config(
            tmp_path,
            pop3=["tcp:1110"],
            smtp=["tcp:2525"],
            lmtp=["tcp:2424"],
            maxConnections=7,
            maxConnectionsPerAddress=2,
            banAfter=4,
            exemptNetworks=["none"],
        ),
        reactor=reactor,
    )
    root.privilegedStartService()
    root.startService()
    try:
        policy = root.policy
        assert isinstance(policy, ConnectionPolicy)
        assert policy.settings.maxConnections == 7
        assert policy.settings.maxConnectionsPerAddress == 2
        assert policy.settings.banAfter == 4
        assert "127.0.0.1" not in policy.exempt
        factories = {port: factory for port, factory, _, _ in reactor.tcpServers}
        assert set(factories) == {1110, 2525, 2424}
        assert all(f.policy is policy for f in factories.values())
    finally:
        root.stopService()


def test_factoriesDefaultToTheOpenPolicy():
    assert isinstance(POP3Factory(None, Clock(), hostname="x").policy, OpenPolicy)
    assert isinstance(SMTPFactory(None, Clock(), hostname="x").policy, OpenPolicy)


def test_settingsOutOfRangeStopStartUp(tmp_path):
    with pytest.raises(ConfigurationError, match="banWindow"):
        makeService(config(tmp_path, banWindow=0), reactor=MemoryReactorClock())
    with pytest.raises(ConfigurationError):
        makeService(config(tmp_path, exemptNetworks=["nonsense"]), reactor=MemoryReactorClock())


def test_refreshTimerRunsWithTheService(tmp_path):
    """
    Once the reactor runs, the service's policy reads the database's bans
    (a ban the admin made before start-up is enforced), through the
    store's worker threads; stopping the service stops its timer.
    """
    cfg = config(tmp_path, pop3=[], exemptNetworks=["none"])
    admin = openSynchronousStore(cfg.database)
    resultOf(SQLPolicyStore(admin.database).addBan("192.0.2.9", time.time(), 600))
    admin.close()
    reactor = IteratedReactor()
    root = makeService(cfg, reactor=reactor)
    root.privilegedStartService()
    root.startService()
    try:
        policy = root.policy
        assert policy.sync.refreshes == 0
        reactor.fireSystemEvent("startup")
        reactor.turnUntil(lambda: policy.sync.refreshes >= 1)
        assert policy.admit("pop3", IPv4Address("TCP", "192.0.2.9", 1)) == BANNED
    finally:
        reactor.resultOf(root.stopService())
        reactor.close()
    assert not policy.sync._loop
