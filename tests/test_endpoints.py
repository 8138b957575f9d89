"""
Listen backlogs: every listener gets a backlog of at least 1024 unless its
description sets one (Twisted's default of 50 left some of 200 clients
connecting at once never greeted), inside haproxy: descriptions too.
"""

import pytest
from twisted.internet.testing import MemoryReactorClock

from mailgate.service import MailgateConfig, makeService
from mailgate.session.endpoints import DEFAULT_BACKLOG, serverEndpoint, withBacklog
from mailgate.session.proxy import ProxyHeaderFactory


@pytest.mark.parametrize(
    "description, expected",
    [
        ("tcp:110", "tcp:110:backlog=1024"),
        ("tcp:110:interface=127.0.0.1", "tcp:110:interface=127.0.0.1:backlog=1024"),
        ("tcp6:110:interface=\\:\\:1", "tcp6:110:interface=\\:\\:1:backlog=1024"),
        ("ssl:995:privateKey=k.pem:certKey=c.pem", "ssl:995:privateKey=k.pem:certKey=c.pem:backlog=1024"),
        ("unix:/run/mailgate/lmtp", "unix:/run/mailgate/lmtp:backlog=1024"),
        ("haproxy:tcp:110", "haproxy:tcp:110:backlog=1024"),
        # Set by the description: kept.
        ("tcp:110:backlog=10", "tcp:110:backlog=10"),
        ("tcp:110:backlog=4096:interface=127.0.0.1", "tcp:110:backlog=4096:interface=127.0.0.1"),
        ("haproxy:unix:/run/x:backlog=5", "haproxy:unix:/run/x:backlog=5"),
        # Not a listener that takes one.
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        # An escaped colon is not a separator: this is a path, not an option.
        ("unix:/tmp/a\\:backlog=1", "unix:/tmp/a\\:backlog=1:backlog=1024"),
    ],
)
def test_withBacklog(description, expected):
    assert withBacklog(description) == expected


def listen(description):
    reactor = MemoryReactorClock()
    serverEndpoint(reactor, description).listen(object())
    return reactor


def test_tcpListenersGetTheBacklog():
    [(port, _, backlog, interface)] = listen("tcp:1110:interface=127.0.0.1").tcpServers
    assert (port, backlog, interface) == (1110, DEFAULT_BACKLOG, "127.0.0.1")
    [(_, _, backlog, interface)] = listen("tcp6:1110:interface=\\:\\:1").tcpServers
    assert (backlog, interface) == (DEFAULT_BACKLOG, "::1")


def test_unixListenersGetTheBacklog(tmp_path):
    [(address, _, backlog, _, _)] = listen(f"unix:{tmp_path}/lmtp").unixServers
    assert (address, backlog) == (f"{tmp_path}/lmtp", DEFAULT_BACKLOG)


def test_aBacklogInTheDescriptionIsKept():
    [(_, _, backlog, _)] = listen("tcp:1110:backlog=7").tcpServers
    assert backlog == 7


def test_haproxyListenersGetTheBacklog():
    [(_, factory, backlog, _)] = listen("haproxy:tcp:1110").tcpServers
    assert isinstance(factory, ProxyHeaderFactory)
    assert backlog == DEFAULT_BACKLOG


def test_theServiceListensWithTheBacklog(tmp_path):
    reactor = MemoryReactorClock()
    root = makeService(
        MailgateConfig(
            database=f"sqlite:///{tmp_path / 'db.sqlite3'}",
            apop=True,
            pop3=["tcp:1110:interface=127.0.0.1", "haproxy:tcp:1111:interface=127.0.0.1"],
            smtp=["tcp:2525:backlog=2000"],
            lmtp=[f"unix:{tmp_path}/lmtp"],
        ),
        reactor=reactor,
    )
    root.privilegedStartService()
    root.startService()
    try:
        backlogs = {port: backlog for port, _, backlog, _ in reactor.tcpServers}
        assert backlogs == {1110: 1024, 1111: 1024, 2525: 2000}
        [(_, _, backlog, _, _)] = reactor.unixServers
        assert backlog == 1024
    finally:
        root.stopService()
