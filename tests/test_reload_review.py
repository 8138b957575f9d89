"""
A review of what a reload (SIGHUP) of a real C{twistd mailgate --config
FILE} applies, as an administrator of a live server would try it: real
clients from several addresses (127.0.0.2, 127.0.0.3), the metrics
endpoint, the log.  Each test here failed on the server before its fix.

The command line gives the database and the listeners; the file, the
settings a test changes (tests/test_reload_policy.py's helpers).  Every
wait is bounded (L{DEADLINE}); no time is asserted.
"""

from test_e2e_policy import rawConnection
from test_metrics import sample, scrape
from test_reload_policy import FIRST, configured, reload, writeConfig

from e2e import (  # noqa: F401 (mailgate_server is a fixture)
    DEADLINE,
    mailgate_server,
    sqliteOnly,
    waitFor,
)

METRICS = ("--metrics", "tcp:0:interface=127.0.0.1")
SMTP = ("--smtp", "tcp:0:interface=127.0.0.1")
NO_POSTMASTER = "SMTP listens without --postmaster"


def openPOP3(server):
    """
    The POP3 connections open on C{server}, as its metrics count them.
    """
    _, text = scrape(server)
    return sample(text, "mailgate_connections", protocol="pop3")


@sqliteOnly
def test_aLimitLoweredUnderTheConnectionsOpenClosesIdleClientsAsTheStressSays(mailgate_server, tmp_path):
    """
    Ten clients connected and silent, not logged in, under max-connections
    20; a reload lowering it to 10 puts the server under stress, and the
    log says that clients that have not logged in are closed after a few
    seconds of idleness until fewer than 7 remain.  They are: the open
    sessions are held to the stress's short idle timeout at once, as when
    a connection brings the stress.  They were not: over the lowered limit
    no connection is admitted to bring it, and the idle clients kept their
    slots for their whole login timeout (two minutes here), everyone else
    refused meanwhile.
    """
    settings = {"max_connections_per_ip": "50", "login_timeout": "120", "idle_timeout": "600"}
    server, path = configured(mailgate_server, tmp_path, *METRICS, max_connections="20", **settings)
    held = []
    try:
        for _ in range(10):
            sock, reader = rawConnection(server.port, FIRST)
            held.append(sock)
            assert reader.line().startswith(b"+OK")
        assert openPOP3(server) == 10
        writeConfig(path, max_connections="10", **settings)
        line = reload(server)
        assert "max-connections" in line, server.log()
        assert "until fewer than 7 remain (stress)" in server.stdout, server.log()
        waitFor(lambda: openPOP3(server) < 7, "the idle clients to be closed under stress", timeout=2 * DEADLINE)
    finally:
        for sock in held:
            sock.close()


@sqliteOnly
def test_aReloadThatTakesThePostmasterAwayWarnsAsAStartWould(mailgate_server, tmp_path):
    """
    A server with SMTP started with a postmaster says nothing of it; a
    reload of a file without postmaster (which a SIGHUP applies since
    7b01237: mail to postmaster is refused from then on) warns as a start
    without it does (smtp.no_postmaster), rather than leaving the
    administrator to learn it from the bounces.
    """
    server, path = configured(mailgate_server, tmp_path, *SMTP, postmaster='"alice@example.org"')
    assert NO_POSTMASTER not in server.stdout
    writeConfig(path)
    line = reload(server)
    assert "postmaster" in line, server.log()
    waitFor(lambda: NO_POSTMASTER in server.stdout, "the warning of no postmaster")


@sqliteOnly
def test_aReloadThatTurnsTracingOnWarnsAsAStartWould(mailgate_server, tmp_path):
    """
    A server started without tracing says nothing of it; a reload that
    adds a debug-peer (which a SIGHUP applies at once) warns whose
    commands and replies now go to the log, as a start with it does
    (trace.enabled): a trace left on by mistake fills the log with a
    user's commands, and the start's warning was the only reminder.
    """
    server, path = configured(mailgate_server, tmp_path)
    assert "tracing the sessions of" not in server.stdout
    writeConfig(path, debug_peer='["127.0.0.9"]')
    line = reload(server)
    assert "debug-peer" in line, server.log()
    waitFor(lambda: "tracing the sessions of clients on 127.0.0.9" in server.stdout, "the warning of tracing")
