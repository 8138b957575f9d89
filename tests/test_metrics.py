"""
mailgate.metrics: the Prometheus names and labels (a contract), bounded
label values, the store's reports (time per operation, errors, group
commits, maildrop locks, the credential cache), the /metrics and /healthz
resource, and a real twistd scraped over HTTP and checked by promtool.
"""

import poplib
import shutil
import socket
import smtplib
import subprocess
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from e2e import DEADLINE, postgresOnly, waitFor
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
import mailgate
from mailgate.auth.cache import VerifiedCredentialCache
from mailgate.auth.sasl import SASLServer
from mailgate.auth.passwords import makeCredentials
from mailgate.errors import ShuttingDown, TemporaryFailure, WritesFailing
from mailgate.message import spoolBytes
from mailgate.metrics import MAX_OPERATIONS, Metrics
from mailgate.metricssite import IDLE_TIMEOUT, MAX_CONNECTIONS, MetricsResource, metricsSite
from mailgate.store import openStore
from mailgate.store.sql import _findUser
from mailgate.testing import TEST_HASH_COST
from pumped import PumpedReactor

# The contract: name (as the exposition shows it, without _total for
# counters' families), type, labels.
CONTRACT = {
    "mailgate_build_info": ("gauge", {"version"}),
    "mailgate_config_last_reload_successful": ("gauge", set()),
    "mailgate_config_restart_needed": ("gauge", {"setting"}),
    "mailgate_connections": ("gauge", {"protocol"}),
    "mailgate_sessions": ("counter", {"protocol"}),
    "mailgate_connections_refused": ("counter", {"protocol", "reason"}),
    "mailgate_tls_failures": ("counter", {"protocol"}),
    "mailgate_tls_sessions": ("counter", {"protocol", "version"}),
    "mailgate_logins": ("counter", {"protocol", "mechanism", "result"}),
    "mailgate_pop3_commands": ("counter", {"command"}),
    "mailgate_pop3_retrieved_bytes": ("counter", set()),
    "mailgate_pop3_deleted_messages": ("counter", set()),
    "mailgate_deliveries": ("counter", {"protocol", "result"}),
    "mailgate_delivered_bytes": ("counter", set()),
    "mailgate_delivery_seconds": ("histogram", set()),
    "mailgate_database_seconds": ("histogram", {"operation"}),
    "mailgate_database_errors": ("counter", set()),
    "mailgate_group_commit_size": ("histogram", set()),
    "mailgate_auth_cache": ("counter", {"result"}),
    "mailgate_maildrop_locks": ("gauge", set()),
    "mailgate_bans": ("gauge", set()),
    "mailgate_timeouts": ("counter", {"protocol", "kind"}),
    "mailgate_forbidden_commands": ("counter", {"protocol"}),
    "mailgate_database_writes_failing": ("gauge", {"reason"}),
    "mailgate_retention_removed_messages": ("counter", {"kind"}),
    "mailgate_retention_rounds": ("counter", {"result"}),
    "mailgate_recipients_refused": ("counter", {"protocol", "reason"}),
    "mailgate_senders_refused": ("counter", {"protocol", "reason"}),
    "mailgate_xclient_commands": ("counter", {"protocol", "command", "result"}),
    "mailgate_log_lines_lost": ("counter", set()),
    "mailgate_log_last_reopen_successful": ("gauge", set()),
}


def families(metrics):
    from prometheus_client import generate_latest

    return {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}


def value(metrics, name, **labels):
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


# -- names, types, labels ---------------------------------------------------------


def test_namesTypesAndLabelsAreTheContract():
    exported = families(Metrics())
    for name, (kind, labels) in CONTRACT.items():
        assert name in exported, name
        family = exported[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    # The client library's standard process and platform metrics.
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "python_info"):
        assert name in exported, name


def test_smallLabelSetsStartAtZero():
    metrics = Metrics()
    assert metrics.registry.get_sample_value("mailgate_connections", {"protocol": "lmtp"}) == 0
    assert metrics.registry.get_sample_value(
        "mailgate_logins_total", {"protocol": "pop3", "mechanism": "scram-sha-256", "result": "in_use"}
    ) == 0
    assert metrics.registry.get_sample_value("mailgate_deliveries_total", {"protocol": "smtp", "result": "tempfail"}) == 0
    assert metrics.registry.get_sample_value("mailgate_pop3_commands_total", {"command": "RETR"}) == 0
    assert metrics.registry.get_sample_value("mailgate_auth_cache_total", {"result": "hit"}) == 0
    # Every command each protocol has, with every result: POP3 has no
    # XFORWARD.
    xclient = {
        (s.labels["protocol"], s.labels["command"], s.labels["result"]): s.value
        for s in families(metrics)["mailgate_xclient_commands"].samples
        if s.name == "mailgate_xclient_commands_total"
    }
    results = ("accepted", "refused_network", "refused_sequence", "refused_syntax")
    assert xclient == dict.fromkeys(
        [(p, c, r) for p in ("smtp", "lmtp") for c in ("XFORWARD", "XCLIENT") for r in results]
        + [("pop3", "XCLIENT", r) for r in results],
        0,
    )


def test_everyLoginMechanismHasItsOwnSeries():
    """
    Each mechanism a POP3 client may log in with (every SASL mechanism the
    server can offer, OAuth 2.0's too) is counted under its own name, from
    zero: OAUTHBEARER and XOAUTH2 logins were counted as mechanism
    "other", a series that did not exist until the first, so a dashboard
    of logins by mechanism never showed the clients using tokens.
    """
    server = SASLServer(findUser=None, hostname="mailgate.test", offerCramMD5=lambda: True, bearerTokens=True)
    mechanisms = ["user", "apop"] + [name.lower() for name in server.mechanisms(plaintextAllowed=True)]
    assert {"oauthbearer", "xoauth2"} <= set(mechanisms)
    m = Metrics()
    for mechanism in mechanisms:
        assert m.registry.get_sample_value(
            "mailgate_logins_total", {"protocol": "pop3", "mechanism": mechanism, "result": "failed"}
        ) == 0, mechanism
        m.login("pop3", mechanism, "ok")
    for mechanism in mechanisms:
        assert value(m, "mailgate_logins_total", protocol="pop3", mechanism=mechanism, result="ok") == 1, mechanism
    assert value(m, "mailgate_logins_total", protocol="pop3", mechanism="other", result="ok") == 0


def test_noSeriesIsExportedTwice():
    """
    Setting a gauge of one label moves its series, it does not add a
    second one with the same labels: Prometheus keeps the first sample of
    a series in a scrape and drops the others, so an alert on
    mailgate_node_settings_differ never saw its 1 behind the initial 0.
    """
    metrics = Metrics()
    metrics.settingsDiffer({"expire_days"})
    metrics.writesFailing("storage_full")
    for family in families(metrics).values():
        seen = [(sample.name, tuple(sorted(sample.labels.items()))) for sample in family.samples]
        assert len(seen) == len(set(seen)), family.name
    assert value(metrics, "mailgate_node_settings_differ", setting="expire_days") == 1
    assert value(metrics, "mailgate_node_settings_differ", setting="default_quota") == 0
    assert value(metrics, "mailgate_database_writes_failing", reason="storage_full") == 1
    metrics.writesFailing(None)
    assert value(metrics, "mailgate_database_writes_failing", reason="storage_full") == 0


def test_theLogFilesLostLinesAndFailedReopeningAreExported(tmp_path):
    """
    Lines the log file did not take (its disk full: /dev/full refuses
    every write with ENOSPC) are counted as they are lost, not only told
    in the log once there is room again, which an alert on a full log
    disk cannot wait for; a reopening that failed (logrotate's SIGUSR1
    with the log's directory gone) is 0 until one works.  Without a log
    file (standard output), 0 lines lost and 1.
    """
    from mailgate.logs import LogStream

    metrics = Metrics()
    assert value(metrics, "mailgate_log_lines_lost_total") == 0
    assert value(metrics, "mailgate_log_last_reopen_successful") == 1
    full = LogStream("/dev/full")
    metrics.logStream(full)
    for n in range(3):
        full.write(f"line {n}\n")
    assert value(metrics, "mailgate_log_lines_lost_total") == 3
    assert value(metrics, "mailgate_log_last_reopen_successful") == 1
    full.close()

    directory = tmp_path / "logs"
    directory.mkdir()
    stream = LogStream(str(directory / "mailgate.log"))
    metrics.logStream(stream)
    directory.rename(tmp_path / "rotated")
    with pytest.raises(OSError):
        stream.reopen()
    assert value(metrics, "mailgate_log_last_reopen_successful") == 0
    directory.mkdir()
    assert stream.reopen()
    assert value(metrics, "mailgate_log_last_reopen_successful") == 1
    stream.write("written\n")
    stream.close()
    assert (directory / "mailgate.log").read_text() == "written\n"


def test_theReleaseRunningIsExported():
    assert value(Metrics(), "mailgate_build_info", version=mailgate.__version__) == 1


def test_eachServerHasItsOwnRegistry():
    first, second = Metrics(), Metrics()
    first.connectionOpened("pop3")
    assert value(first, "mailgate_sessions_total", protocol="pop3") == 1
    assert value(second, "mailgate_sessions_total", protocol="pop3") == 0


def test_callsMoveTheirSeries():
    m = Metrics()
    m.connectionOpened("pop3")
    m.connectionOpened("pop3")
    m.connectionOpened("smtp")
    m.connectionClosed("pop3")
    assert value(m, "mailgate_connections", protocol="pop3") == 1
    assert value(m, "mailgate_sessions_total", protocol="pop3") == 2
    assert m.openConnections() == {"pop3": 1, "smtp": 1, "lmtp": 0}
    m.connectionRefused("pop3", "banned")
    m.connectionRefused("smtp", "too many connections")
    m.connectionRefused("smtp", "too many connections")
    m.connectionRefused("lmtp", "shutting down")
    assert value(m, "mailgate_connections_refused_total", protocol="pop3", reason="banned") == 1
    assert value(m, "mailgate_connections_refused_total", protocol="smtp", reason="too_many") == 2
    assert value(m, "mailgate_connections_refused_total", protocol="lmtp", reason="shutting_down") == 1
    assert value(m, "mailgate_connections", protocol="smtp") == 1
    m.tlsFailed("pop3")
    assert value(m, "mailgate_tls_failures_total", protocol="pop3") == 1
    assert value(m, "mailgate_tls_failures_total", protocol="smtp") == 0
    # Every version a session can negotiate is there at zero from the start.
    assert {
        (p, v): value(m, "mailgate_tls_sessions_total", protocol=p, version=v)
        for p in ("pop3", "smtp", "lmtp") for v in ("TLSv1.2", "TLSv1.3")
    } == dict.fromkeys([(p, v) for p in ("pop3", "smtp", "lmtp") for v in ("TLSv1.2", "TLSv1.3")], 0)
    m.tlsEstablished("pop3", "TLSv1.2")
    m.tlsEstablished("smtp", "TLSv1.3")
    m.tlsEstablished("smtp", "TLSv1.3")
    m.tlsEstablished("smtp", "SSLv3")
    assert value(m, "mailgate_tls_sessions_total", protocol="pop3", version="TLSv1.2") == 1
    assert value(m, "mailgate_tls_sessions_total", protocol="pop3", version="TLSv1.3") == 0
    assert value(m, "mailgate_tls_sessions_total", protocol="smtp", version="TLSv1.3") == 2
    assert value(m, "mailgate_tls_sessions_total", protocol="smtp", version="other") == 1
    m.login("pop3", "user", "ok")
    m.login("pop3", "apop", "failed")
    assert value(m, "mailgate_logins_total", protocol="pop3", mechanism="user", result="ok") == 1
    assert value(m, "mailgate_logins_total", protocol="pop3", mechanism="apop", result="failed") == 1
    m.pop3Command("RETR")
    m.pop3Command("retr")
    assert value(m, "mailgate_pop3_commands_total", command="RETR") == 2
    m.retrieved(1234)
    m.deleted(3)
    assert value(m, "mailgate_pop3_retrieved_bytes_total") == 1234
    assert value(m, "mailgate_pop3_deleted_messages_total") == 3
    m.delivery("lmtp", "accepted", octets=500, seconds=0.02)
    m.delivery("smtp", "rejected", octets=900, seconds=0.5)
    assert value(m, "mailgate_deliveries_total", protocol="lmtp", result="accepted") == 1
    assert value(m, "mailgate_deliveries_total", protocol="smtp", result="rejected") == 1
    # Only accepted mail counts as delivered octets and delivery time.
    assert value(m, "mailgate_delivered_bytes_total") == 500
    assert value(m, "mailgate_delivery_seconds_count") == 1
    assert value(m, "mailgate_delivery_seconds_bucket", le="0.025") == 1
    m.databaseOperation("findUser", 0.003)
    m.databaseError()
    m.groupCommit(5)
    assert value(m, "mailgate_database_seconds_count", operation="findUser") == 1
    assert value(m, "mailgate_database_errors_total") == 1
    assert value(m, "mailgate_group_commit_size_sum") == 5
    m.authCache(True)
    m.authCache(False)
    m.authCache(False)
    assert value(m, "mailgate_auth_cache_total", result="hit") == 1
    assert value(m, "mailgate_auth_cache_total", result="miss") == 2
    m.maildropLocks(7)
    m.bans(2)
    assert value(m, "mailgate_maildrop_locks") == 7
    assert value(m, "mailgate_bans") == 2
    assert value(m, "mailgate_timeouts_total", protocol="smtp", kind="data_rate") == 0
    m.timedOut("smtp", "data_rate")
    m.timedOut("pop3", "login")
    m.timedOut("pop3", "no-such-kind")
    assert value(m, "mailgate_timeouts_total", protocol="smtp", kind="data_rate") == 1
    assert value(m, "mailgate_timeouts_total", protocol="pop3", kind="login") == 1
    assert value(m, "mailgate_timeouts_total", protocol="pop3", kind="other") == 1
    m.relayCommand("lmtp", "XFORWARD", "accepted")
    m.relayCommand("lmtp", "XFORWARD", "accepted")
    m.relayCommand("pop3", "XCLIENT", "refused_network")
    assert value(m, "mailgate_xclient_commands_total", protocol="lmtp", command="XFORWARD", result="accepted") == 2
    assert value(m, "mailgate_xclient_commands_total", protocol="smtp", command="XFORWARD", result="accepted") == 0
    assert value(
        m, "mailgate_xclient_commands_total", protocol="pop3", command="XCLIENT", result="refused_network"
    ) == 1


def test_labelValuesAreBounded():
    m = Metrics()
    m.connectionOpened("alice@example.org")
    m.login("imap", "ntlm", "maybe")
    m.pop3Command("XYZZY")
    m.pop3Command(None)
    m.delivery("smtp", "lost")
    m.connectionRefused("pop3", "a reason nobody wrote down")
    m.relayCommand("pop3", "XFORWARD", "accepted")
    m.relayCommand("smtp", "xclient", "maybe")
    m.relayCommand("imap", "XCLIENT", "accepted")
    assert value(m, "mailgate_sessions_total", protocol="other") == 1
    assert value(m, "mailgate_logins_total", protocol="other", mechanism="other", result="other") == 1
    assert value(m, "mailgate_pop3_commands_total", command="OTHER") == 2
    assert value(m, "mailgate_deliveries_total", protocol="smtp", result="other") == 1
    assert value(m, "mailgate_connections_refused_total", protocol="pop3", reason="other") == 1
    # POP3 has no XFORWARD; the commands are upper case, as sent.
    assert value(m, "mailgate_xclient_commands_total", protocol="pop3", command="OTHER", result="accepted") == 1
    assert value(m, "mailgate_xclient_commands_total", protocol="smtp", command="OTHER", result="other") == 1
    assert value(m, "mailgate_xclient_commands_total", protocol="other", command="OTHER", result="accepted") == 1
    for n in range(MAX_OPERATIONS + 10):
        m.databaseOperation(f"operation{n}", 0.001)
    operations = {
        s.labels["operation"] for s in families(m)["mailgate_database_seconds"].samples
    }
    assert len(operations) == MAX_OPERATIONS + 1
    assert "other" in operations
    assert value(m, "mailgate_database_seconds_count", operation="other") == 10
    # No address ever became a label value.
    assert "@" not in "".join(str(s.labels) for f in families(m).values() for s in f.samples)


# -- what the store reports ---------------------------------------------------------


def _brokenRead(cursor):
    cursor.execute("SELECT * FROM no_such_table")


def test_storeReports(databaseURL):
    """
    A real store on worker threads: every operation's time by its name,
    writes sharing a commit, failures that are the database's (not a
    refusal such as an existing user), and the maildrop locks held.
    """
    metrics = Metrics()
    reactor = PumpedReactor()
    store = openStore(databaseURL, reactor=reactor, metrics=metrics)
    try:
        credentials = makeCredentials(b"secret", logN=TEST_HASH_COST)
        assert reactor.wait(store.addUser("alice@example.org", credentials)) is not None
        user = reactor.wait(store.findUser("alice@example.org"))
        deliveries = [
            store.deliver(["alice@example.org"], spoolBytes(b"Subject: %d\r\n\r\nbody\r\n" % n))
            for n in range(20)
        ]
        reactor.resultOf(defer.gatherResults(deliveries))
        assert value(metrics, "mailgate_database_seconds_count", operation="addUser") == 1
        assert value(metrics, "mailgate_database_seconds_count", operation="findUser") == 1
        assert value(metrics, "mailgate_database_seconds_count", operation="deliver") == 20
        # Twenty deliveries, fewer commits: each commit's size observed.
        commits = value(metrics, "mailgate_group_commit_size_count")
        assert value(metrics, "mailgate_group_commit_size_sum") == 21
        assert 2 <= commits < 21
        assert value(metrics, "mailgate_database_errors_total") == 0

        # A refusal is an answer, not a database error.
        refused = reactor.wait(store.addUser("alice@example.org", credentials))
        assert isinstance(refused, Failure)
        assert value(metrics, "mailgate_database_errors_total") == 0
        broken = reactor.wait(store.database.runInteraction(_brokenRead))
        assert isinstance(broken, Failure)
        assert value(metrics, "mailgate_database_errors_total") == 1
        assert value(metrics, "mailgate_database_seconds_count", operation="brokenRead") == 1

        if store.engine.name != "sqlite":
            # PostgreSQL's maildrop locks run on reactor-driven connections,
            # which this stand-in reactor does not drive; the scrape of a
            # real server below shows the gauge on both backends.
            return
        identity = user
        maildrop = reactor.wait(store.openMaildrop(identity))
        assert len(maildrop.sizes) == 20
        assert value(metrics, "mailgate_maildrop_locks") == 1
        second = reactor.wait(store.openMaildrop(identity))
        assert isinstance(second, Failure)
        assert value(metrics, "mailgate_maildrop_locks") == 1
        reactor.resultOf(maildrop.release())
        assert value(metrics, "mailgate_maildrop_locks") == 0
        reactor.resultOf(maildrop.release())
        assert value(metrics, "mailgate_maildrop_locks") == 0
    finally:
        reactor.resultOf(store.close())


def _brokenWrite(cursor):
    cursor.execute("INSERT INTO no_such_table VALUES (1)")


def test_healthFollowsTheWrites(databaseURL):
    """
    A database that answers reads but refuses writes (a full disk) is not
    healthy: the health check reports why the last write transaction
    failed, until one commits again.  A refusal (an existing user) is an
    answer, not a failure.
    """
    from mailgate.service import MailgateService

    reactor = PumpedReactor()
    store = openStore(databaseURL, reactor=reactor)
    root = MailgateService(store, reactor=reactor)
    root.running = True
    try:
        credentials = makeCredentials(b"secret", logN=TEST_HASH_COST)
        reactor.resultOf(store.addUser("alice@example.org", credentials))
        assert reactor.wait(root.databaseAnswers()) is None
        assert isinstance(reactor.wait(store.database.runWrite(_brokenWrite)), Failure)
        unhealthy = reactor.wait(root.databaseAnswers())
        assert isinstance(unhealthy, Failure) and unhealthy.check(WritesFailing)
        assert str(unhealthy.value).startswith("writes fail: ")
        assert "no_such_table" in str(unhealthy.value)
        # What the health endpoint may say of it: the kind, not the text.
        assert unhealthy.value.kind in ("OperationalError, SQLITE_ERROR", "UndefinedTable, SQLSTATE 42P01")
        resource = MetricsResource(Metrics(), root.databaseAnswers, reactor, timeout=10.0)
        with capturedLogs() as logs:
            answer = get(resource, b"/healthz")
            reactor.pump(lambda: answer.finished)
        assert answer.responseCode == 503
        assert b"".join(answer.written).decode() == f"unavailable: database writes fail ({unhealthy.value.kind})\n"
        failed = [e["reason"] for e in logs if e.get("event") == "health.failed"]
        assert len(failed) == 1 and "no_such_table" in failed[0], failed
        # Still unhealthy after a refusal; healthy once a write commits.
        assert isinstance(reactor.wait(store.addUser("alice@example.org", credentials)), Failure)
        assert isinstance(reactor.wait(root.databaseAnswers()), Failure)
        reactor.resultOf(store.addUser("bob@example.org", credentials))
        assert reactor.wait(root.databaseAnswers()) is None
    finally:
        reactor.resultOf(store.close())


def test_eachProtocolsHealthAsksWhatItNeeds(databaseURL):
    """
    /healthz/pop3 asks only that the database reads: a database that takes
    no writes (a full disk, shared by every node) leaves POP3 logins and
    RETR working, and a balancer's POP3 backend must keep its nodes, so
    it answers 200 and says the writes fail; /healthz/smtp and /healthz/lmtp
    answer 503, as /healthz does (every delivery would be deferred).  A
    protocol the node has no listener for is 503 whatever the database
    does: a backend that checks it points at the wrong node.  Once
    stopping, every one is 503.
    """
    from mailgate.service import ListeningService, MailgateService

    reactor = PumpedReactor()
    store = openStore(databaseURL, reactor=reactor)
    root = MailgateService(store, reactor=reactor)
    # Configured, never started: what is served is what is configured.
    root.addListener(ListeningService("POP3S", "ssl:0", None, None))
    root.addListener(ListeningService("SMTP", "tcp:0", None, None))
    root.running = True
    resource = MetricsResource(Metrics(), root.databaseAnswers, reactor, 10.0, root.protocolAnswers)

    def health(path):
        answer = get(resource, path)
        reactor.pump(lambda: answer.finished)
        return answer.responseCode, b"".join(answer.written).decode()

    try:
        assert health(b"/healthz/pop3") == (200, "ok\n")
        assert health(b"/healthz/smtp") == (200, "ok\n")
        assert health(b"/healthz/lmtp") == (503, "unavailable: this node has no lmtp listener\n")
        assert isinstance(reactor.wait(store.database.runWrite(_brokenWrite)), Failure)
        kind = store.database.writeFailureKind
        assert kind in ("OperationalError, SQLITE_ERROR", "UndefinedTable, SQLSTATE 42P01")
        with capturedLogs() as logs:
            # A balancer checking both backends, in turn.
            for _ in range(3):
                assert health(b"/healthz/pop3") == (200, f"ok, but database writes fail ({kind})\n")
                assert health(b"/healthz/smtp") == (503, f"unavailable: database writes fail ({kind})\n")
                assert health(b"/healthz") == (503, f"unavailable: database writes fail ({kind})\n")
                assert health(b"/healthz/lmtp") == (503, "unavailable: this node has no lmtp listener\n")
        # Once per endpoint that fails, however often asked (LMTP's was
        # logged at its first probe, before); nothing of POP3's, which
        # passes, and no recovery between the probes.
        failed = [(e["check"], e["reason"]) for e in logs if e.get("event") == "health.failed"]
        assert sorted(check for check, _ in failed) == ["/healthz", "/healthz/smtp"], failed
        assert all("no_such_table" in reason for _, reason in failed), failed
        assert [e for e in logs if e.get("event") == "health.recovered"] == []
        # A write that commits: every protocol served is healthy again.
        reactor.resultOf(store.addUser("bob@example.org", makeCredentials(b"secret", logN=TEST_HASH_COST)))
        with capturedLogs() as logs:
            assert health(b"/healthz/smtp") == (200, "ok\n")
            assert health(b"/healthz/pop3") == (200, "ok\n")
        assert [e["check"] for e in logs if e.get("event") == "health.recovered"] == ["/healthz/smtp"]
        root.running = False
        for path in (b"/healthz/pop3", b"/healthz/smtp", b"/healthz/lmtp"):
            assert health(path) == (503, "unavailable: shutting down\n")
    finally:
        reactor.resultOf(store.close())


def test_aProtocolsHealthCheckKeepsItsSecond():
    """
    /healthz/pop3 answers within the health check's second whatever the
    check waits for, and names only the error's kind; /healthz/imap and
    deeper paths are 404, as is every /healthz/<protocol> of a resource
    given no protocol check (an embedder's).
    """
    clock = Clock()
    pending = []

    def protocolCheck(protocol):
        pending.append(defer.Deferred())
        return pending[-1]

    root = MetricsResource(Metrics(), lambda: defer.succeed(None), clock, 1.0, protocolCheck)
    slow = get(root, b"/healthz/pop3")
    clock.advance(1.1)
    assert slow.responseCode == 503
    assert b"".join(slow.written) == b"unavailable: the database did not answer within 1 s\n"
    failing = get(root, b"/healthz/lmtp")
    pending[-1].errback(TemporaryFailure("database unavailable: connection to db.internal refused"))
    assert failing.responseCode == 503
    assert b"".join(failing.written) == b"unavailable: database unavailable (TemporaryFailure)\n"
    for path in (b"/healthz/imap", b"/healthz/pop3/x", b"/healthz/POP3"):
        assert get(root, path).responseCode == 404
    plain = MetricsResource(Metrics(), lambda: defer.succeed(None), clock)
    assert get(plain, b"/healthz/pop3").responseCode == 404


def test_authCacheReports():
    metrics = Metrics()
    cache = VerifiedCredentialCache(metrics=metrics)
    assert cache.lookup("alice@example.org", b"secret") is None
    cache.remember("alice@example.org", "$hash", b"secret", user="record")
    assert cache.lookup("alice@example.org", b"secret") == "record"
    assert cache.check("alice@example.org", "$hash", b"secret")
    assert value(metrics, "mailgate_auth_cache_total", result="miss") == 1
    assert value(metrics, "mailgate_auth_cache_total", result="hit") == 2


def test_databaseWithoutMetricsStillWorks(tmp_path):
    reactor = PumpedReactor()
    store = openStore(f"sqlite:///{tmp_path / 'plain.sqlite3'}", reactor=reactor)
    try:
        assert reactor.wait(store.findUser("nobody@example.org")) is None
        assert reactor.wait(store.database.runInteraction(_findUser, "nobody@example.org")) is None
    finally:
        reactor.resultOf(store.close())


# -- the HTTP resource, in memory ------------------------------------------------------


def get(root, path):
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.uri = path
    request.path = path
    body = getChildForRequest(root, request).render(request)
    if body is not NOT_DONE_YET:
        request.write(body)
        request.finish()
    return request


def test_aFailingHealthCheckIsLoggedOncePerReason():
    """
    A load balancer asks /healthz every second or two: a database failing
    for an hour (a full disk) is one warning, not one per probe in a log
    that may be on the full disk, and another when the reason changes;
    one line says when it is healthy again.
    """
    metrics = Metrics()
    verdicts = []

    def check():
        return verdicts.pop(0)

    root = MetricsResource(metrics, check, Clock(), timeout=1.0)
    full = TemporaryFailure("writes fail: database storage full: database or disk is full")
    gone = TemporaryFailure("database unavailable: connection refused")
    with capturedLogs() as logs:
        for verdict in [full, full, full, gone, gone, None, None, full]:
            verdicts.append(defer.succeed(None) if verdict is None else defer.fail(verdict))
            answer = get(root, b"/healthz")
            assert answer.responseCode == (200 if verdict is None else 503)
    failed = [e["reason"] for e in logs if e.get("event") == "health.failed"]
    assert failed == [
        "the database failed: writes fail: database storage full: database or disk is full",
        "the database failed: database unavailable: connection refused",
        "the database failed: writes fail: database storage full: database or disk is full",
    ]
    assert len([e for e in logs if e.get("event") == "health.recovered"]) == 1


def test_theKindOfADatabaseErrorCarriesNoneOfItsText(tmp_path):
    """
    errorKind, what /healthz says of a failure: the driver's class and
    its code (SQLite's result code, PostgreSQL's SQLSTATE, or the one
    pgrefusal wrote into the message), after mailgate's own class when
    that says more than a temporary failure; "storage full" for a full
    disk.  Nothing of the message, which here names a path.
    """
    import sqlite3

    from mailgate.errors import DatabaseRefused, StorageFull, errorKind

    secret = tmp_path / "secret-directory"
    secret.mkdir()
    conn = sqlite3.connect(secret / "mail.sqlite3")
    try:
        with pytest.raises(sqlite3.OperationalError) as raised:
            conn.execute("INSERT INTO no_such_table VALUES (1)")
    finally:
        conn.close()
    driver = raised.value
    assert errorKind(driver) == "OperationalError, SQLITE_ERROR"
    translated = TemporaryFailure(f"database unavailable in {secret}: {driver}")
    translated.__cause__ = driver
    assert errorKind(translated) == "OperationalError, SQLITE_ERROR"
    refused = DatabaseRefused(f"cannot connect to {secret}; a configuration error (SQLSTATE 28P01): wrong")
    refused.__cause__ = driver
    assert errorKind(refused) == "DatabaseRefused, OperationalError, SQLSTATE 28P01, SQLITE_ERROR"
    assert errorKind(StorageFull(f"no space left in {secret}")) == "storage full"
    assert errorKind(TemporaryFailure(f"database unavailable: {secret}")) == "TemporaryFailure"
    assert errorKind(WritesFailing(f"writes fail: {secret}", "storage full")) == "storage full"


def test_metricsAndHealth():
    clock = Clock()
    metrics = Metrics()
    metrics.connectionOpened("pop3")
    answers = {}

    def check():
        answers["d"] = defer.Deferred()
        return answers["d"]

    root = MetricsResource(metrics, check, clock, timeout=1.0)
    scraped = get(root, b"/metrics")
    assert scraped.responseCode in (None, 200)
    assert scraped.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=0.0.4")
    text = b"".join(scraped.written).decode()
    assert 'mailgate_connections{protocol="pop3"} 1.0' in text

    healthy = get(root, b"/healthz")
    assert not healthy.finished
    answers["d"].callback(False)
    assert healthy.finished and healthy.responseCode == 200
    assert b"".join(healthy.written) == b"ok\n"

    failing = get(root, b"/healthz")
    answers["d"].errback(TemporaryFailure("database unavailable: connection refused"))
    assert failing.responseCode == 503
    assert b"".join(failing.written) == b"unavailable: database unavailable (TemporaryFailure)\n"

    # Stopping is no failure: 503 for the balancers, nothing blamed.
    with capturedLogs() as logs:
        stopping = get(root, b"/healthz")
        answers["d"].errback(ShuttingDown("mailgate is shutting down"))
    assert stopping.responseCode == 503
    assert b"".join(stopping.written) == b"unavailable: shutting down\n"
    assert [e for e in logs if e.get("event") == "health.failed"] == []

    slow = get(root, b"/healthz")
    clock.advance(0.9)
    assert not slow.finished
    clock.advance(0.2)
    assert slow.responseCode == 503
    assert b"".join(slow.written) == b"unavailable: the database did not answer within 1 s\n"


@pytest.mark.parametrize("path", [b"/", b"/metric", b"/metrics/extra", b"/healthz/x", b"/favicon.ico"])
def test_anythingElseIsNotFound(path):
    root = MetricsResource(Metrics(), lambda: defer.succeed(None), Clock())
    assert get(root, path).responseCode == 404


@pytest.mark.parametrize(
    "request_",
    [
        # A body far larger than anything kept in memory, announced, with
        # the first 200 KB of it sent at once.
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n"
        b"Expect: 100-continue\r\n\r\n" + b"x" * 200_000,
        # Chunked, and whole in the same read.
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        # A GET with a body.
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["huge", "chunked", "get-with-body"],
)
def test_aRequestBodyIsRefusedAtItsHeaders(request_):
    """
    The metrics site reads no request body: one that announces a body is
    answered 413 once, with the reason, and the connection closed, whatever
    of the body came with the headers; a GET without one is answered as
    ever on the next connection.
    """
    site = metricsSite(Metrics(), lambda: defer.succeed(None), Clock())

    def send(data):
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(data)
        return transport

    refused = send(request_)
    answer = refused.value()
    assert answer.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"Connection: close" in answer
    assert answer.endswith(b"\r\n\r\nrequest bodies are not accepted here: GET /metrics or /healthz\n")
    assert refused.disconnecting

    fine = send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert fine.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert not fine.disconnecting


def _headRequest(path):
    """
    A HEAD request for C{path} to the metrics site: the answer's head, its
    Content-Length, its body, and the log lines it made.
    """
    site = metricsSite(Metrics(), lambda: defer.succeed(None), Clock())
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
    transport = StringTransport()
    protocol.makeConnection(transport)
    with capturedLogs() as events:
        protocol.dataReceived(b"HEAD " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    [length] = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return head, int(length.split(b":")[1]), body, [formatEvent(e) for e in events]


def test_aHeadRequestIsAnsweredWithoutALogLine():
    """
    HEAD /metrics (a monitoring probe) gets a GET's headers, its
    Content-Length the length of the exposition, and no body; Twisted
    logged "is returning a message body. I think I'll eat it." for each.
    """
    head, length, body, logged = _headRequest(b"/metrics")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert length > 1000
    assert body == b""
    assert logged == []


@pytest.mark.parametrize("path", [b"/", b"/nope", b"/metrics/x", b"/healthz/x"])
def test_aHeadRequestForWhatIsNotThereIsAnsweredWithoutALogLine(path):
    """
    HEAD of a path the site does not serve gets 404's headers and no
    body; Twisted logged "I think I'll eat it" for each, a log line per
    request that any client of the metrics port could ask for at will.
    """
    head, length, body, logged = _headRequest(path)
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert length > 0
    assert body == b""
    assert logged == []


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_anAcceptHeaderThatIsNotUTF8GetsTheExpositionWithoutALogLine(method):
    """
    An Accept header that is not UTF-8 (any octets a client of the port
    sends) is read as the media types it names, never decoded as text:
    Twisted's getHeader decodes it as UTF-8, and /metrics answered 500
    "Processing Failed" with a critical log line and a traceback for each
    such request, a client's to repeat at will.  Several Accept headers
    are read together, as HTTP reads them.
    """
    site = metricsSite(Metrics(), lambda: defer.succeed(None), Clock())

    def ask(headers):
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        transport = StringTransport()
        protocol.makeConnection(transport)
        with capturedLogs() as events:
            protocol.dataReceived(method + b" /metrics HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        head = transport.value().partition(b"\r\n\r\n")[0].split(b"\r\n")
        [contentType] = [line for line in head if line.lower().startswith(b"content-type:")]
        return head[0], contentType, [formatEvent(e) for e in events]

    status, contentType, logged = ask(b"Accept: \xff\xfe text/html\r\n")
    assert (status, logged) == (b"HTTP/1.1 200 OK", [])
    assert b"text/plain; version=0.0.4" in contentType
    status, contentType, logged = ask(b"Accept: \xff\r\nAccept: application/openmetrics-text; version=1.0.0\r\n")
    assert (status, logged) == (b"HTTP/1.1 200 OK", [])
    assert b"application/openmetrics-text" in contentType


class _FillingTransport(StringTransport):
    """
    A transport whose send buffer fills: past C{limit} unsent octets it
    pauses its producer, as a real one does, until L{drain}.
    """

    limit = 64 * 1024
    full = False

    def write(self, data):
        super().write(data)
        if not self.full and len(self.value()) > self.limit:
            self.full = True
            self.producer.pauseProducing()

    def drain(self):
        sent = self.value()
        self.clear()
        self.full = False
        self.producer.resumeProducing()
        return sent


def test_aClientThatReadsNoAnswersGetsNoMore():
    """
    Requests pipelined by a client that reads none of the answers: once
    the transport's buffer is full, the site answers no more of them and
    stops reading, instead of holding every answer; as the client reads,
    the rest are answered, in order, none lost.
    """
    site = metricsSite(Metrics(), lambda: defer.succeed(None), Clock())
    site.startFactory()
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
    transport = _FillingTransport()
    protocol.makeConnection(transport)
    requests = 300
    protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * requests)
    answered = transport.value().count(b"HTTP/1.1 200 OK\r\n")
    held = len(transport.value())
    assert 1 <= answered < 20, answered
    assert held < 2 * transport.limit, held
    assert transport.producerState == "paused"
    total = answered
    for _ in range(requests):
        if total == requests:
            break
        transport.drain()
        # What the client's reading let through: a bounded few more.
        total += transport.value().count(b"HTTP/1.1 200 OK\r\n")
        assert len(transport.value()) < 2 * transport.limit
    assert total == requests
    # The last answers read too (they may have filled the buffer again),
    # reading goes on.
    transport.drain()
    assert transport.producerState == "producing"
    assert not transport.disconnecting
    site.stopFactory()


def test_theSiteLogsNoLineOfItsOwnAsItStartsAndStops():
    """
    The listener's "METRICS listening on" line says the site started; the
    factory wrapping it wrote a line of its own at each start and stop,
    naming an object's memory address under its class's name as event.
    """
    site = metricsSite(Metrics(), lambda: None, Clock())
    with capturedLogs() as events:
        site.doStart()
        site.doStop()
    assert events == []


def test_anIdleConnectionIsClosedOnTheGivenReactor():
    """
    A connection that sends nothing is closed after L{IDLE_TIMEOUT}
    seconds of the reactor given to the site (not the global one's).
    """
    clock = Clock()
    site = metricsSite(Metrics(), lambda: defer.succeed(None), clock)
    site.startFactory()
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
    transport = StringTransport()
    protocol.makeConnection(transport)
    clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting
    site.stopFactory()


def test_anIdleConnectionIsClosedWithoutALogLine():
    """
    A connection idle past L{IDLE_TIMEOUT} (a scraper whose interval is
    longer, a client that opened it and sent nothing more) is closed
    without a log line, and aborted if its answers are still unsent
    C{abortTimeout} seconds later, without one either: Twisted logged
    "Timing out client: IPv4Address(...)" and "Forcibly timing out
    client: ...", with that Python text as the JSON log's C{peer}.
    """
    clock = Clock()
    site = metricsSite(Metrics(), lambda: defer.succeed(None), clock)
    site.startFactory()
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
    transport = StringTransport()
    protocol.makeConnection(transport)
    with capturedLogs() as events:
        protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
        clock.advance(IDLE_TIMEOUT - 1)
        assert not transport.disconnecting
        clock.advance(2)
        assert transport.disconnecting and not transport.disconnected
        # A StringTransport never ends closing: a client that reads nothing.
        clock.advance(protocol.wrappedProtocol.abortTimeout)
        assert transport.disconnected
        protocol.connectionLost(Failure(ConnectionDone()))
    assert [formatEvent(event) for event in events] == []
    assert clock.getDelayedCalls() == []
    site.stopFactory()


def test_aConnectionBeyondTheLimitTakesThePlaceOfTheQuietestOne():
    """
    At L{MAX_CONNECTIONS} open connections, the next one takes the place
    of the one quiet longest (32 connections left silent kept every
    health check out until the idle timeout); it is closed as it arrives
    (Twisted closes it at once) only while every connection has a request
    being answered.
    """
    checks = []

    def check():
        checks.append(defer.Deferred())
        return checks[-1]

    site = metricsSite(Metrics(), check, Clock())
    site.startFactory()
    address = IPv4Address("TCP", "127.0.0.1", 4321)

    def connect():
        protocol = site.buildProtocol(address)
        if protocol is None:
            return None
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    held = [connect() for _ in range(MAX_CONNECTIONS)]
    # The first one is the quietest but for the second, which spoke last.
    held[1][0].dataReceived(b"GET /healthz HTTP/1.1\r\n")
    protocol, transport = connect()
    assert held[0][1].disconnecting and not any(t.disconnecting for _, t in held[1:])
    held[0][0].connectionLost(Failure(ConnectionDone()))
    protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    # Every connection waits for its health check: none gives way.
    held[1][0].dataReceived(b"Host: x\r\n\r\n")
    for p, _ in held[2:]:
        p.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(checks) == MAX_CONNECTIONS
    assert connect() is None
    assert not any(t.disconnecting for _, t in held[1:])
    # One answered: quiet again, it is the one to give way.
    checks[5].callback(None)
    assert held[5][1].value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert connect() is not None
    assert held[5][1].disconnecting
    site.stopFactory()


# -- a real twistd, scraped --------------------------------------------------------------


PROMTOOL = shutil.which("promtool")


def scrape(server, path="/metrics"):
    url = f"http://127.0.0.1:{server.portOf('METRICS')}{path}"
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sample(text, name, **labels):
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def promtoolCheck(text):
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (Debian package prometheus; tests/sysdeps.sh installs it)")
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=DEADLINE
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


MESSAGE = b"Subject: scraped\r\n\r\nhello, metrics\r\n"


def exercise(server, mailgate_cli, whileLoggedIn=lambda: None):
    """
    What a user does: a delivery by SMTP, a POP3 login, RETR, DELE, QUIT.
    @param whileLoggedIn: called while the POP3 session is logged in.
    @return: the size of the message as POP3 reports it.
    """
    mailgate_cli.addUser("alice@example.org", "secret")
    with smtplib.SMTP("127.0.0.1", server.portOf("SMTP"), timeout=DEADLINE) as smtp:
        smtp.sendmail("bob@example.net", ["alice@example.org"], MESSAGE)
    pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    pop.user("alice@example.org")
    pop.pass_("secret")
    whileLoggedIn()
    _, lines, octets = pop.retr(1)
    pop.dele(1)
    pop.quit()
    return octets


def startScraped(mailgate_server):
    return mailgate_server(
        "--smtp", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1", "--no-apop"
    )


def test_scrapeARunningServer(mailgate_server, mailgate_cli):
    server = startScraped(mailgate_server)
    status, before = scrape(server)
    assert status == 200
    promtoolCheck(before)
    # A series of each small label set is there at 0 from the start.
    assert sample(
        before, "mailgate_xclient_commands_total", protocol="lmtp", command="XFORWARD", result="accepted"
    ) == 0
    during = []
    exercise(server, mailgate_cli, lambda: during.append(scrape(server)[1]))
    assert sample(during[0], "mailgate_maildrop_locks") == 1
    # The QUIT's deletion is committed before +OK; the lock is released.
    status, after = scrape(server)
    assert status == 200
    promtoolCheck(after)
    assert sample(after, "mailgate_database_seconds_count", operation="openMessages") >= 1
    assert sample(after, "mailgate_database_seconds_count", operation="removeMessages") == 1
    assert sample(after, "mailgate_database_seconds_count", operation="deliver") == 1
    assert sample(after, "mailgate_group_commit_size_count") >= 2
    assert sample(after, "mailgate_auth_cache_total", result="miss") >= 1
    assert sample(after, "mailgate_maildrop_locks") == 0
    assert sample(after, "mailgate_database_errors_total") == 0
    assert sample(after, "process_open_fds") > 0
    # Nothing of the session leaks into the labels.
    assert "alice" not in after and "example.org" not in after
    assert scrape(server, "/healthz") == (200, "ok\n")
    assert scrape(server, "/")[0] == 404




def test_aRunningServerRefusesARequestBody(mailgate_server):
    """
    Over a real socket: a POST announcing 10 GB gets its 413 after the
    headers, without the server waiting for (or storing) the body, and
    the server goes on answering scrapes.
    """
    server = startScraped(mailgate_server)
    with socket.create_connection(("127.0.0.1", server.portOf("METRICS")), timeout=DEADLINE) as s:
        # A little of the body: the answer must not wait for the rest.  (All
        # of it read by the server, so that its close is a FIN, not a reset
        # that could overtake the answer.)
        s.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n" + b"x" * 1000)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(4096)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert scrape(server, "/healthz") == (200, "ok\n")


@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
def test_protocolCountersMove(mailgate_server, mailgate_cli):
    server = startScraped(mailgate_server)
    octets = exercise(server, mailgate_cli)
    _, text = scrape(server)
    promtoolCheck(text)
    assert sample(text, "mailgate_sessions_total", protocol="pop3") == 1
    assert sample(text, "mailgate_sessions_total", protocol="smtp") == 1
    assert sample(text, "mailgate_logins_total", protocol="pop3", mechanism="user", result="ok") == 1
    assert sample(text, "mailgate_pop3_commands_total", command="RETR") == 1
    assert sample(text, "mailgate_pop3_commands_total", command="DELE") == 1
    assert sample(text, "mailgate_pop3_commands_total", command="QUIT") == 1
    assert sample(text, "mailgate_pop3_retrieved_bytes_total") == octets
    assert sample(text, "mailgate_pop3_deleted_messages_total") == 1
    assert sample(text, "mailgate_deliveries_total", protocol="smtp", result="accepted") == 1
    assert sample(text, "mailgate_delivered_bytes_total") >= len(MESSAGE)
    assert sample(text, "mailgate_delivery_seconds_count") == 1
    # Both sessions ended.
    waitFor(
        lambda: sample(scrape(server)[1], "mailgate_connections", protocol="pop3") == 0,
        "the POP3 connection gauge back at 0",
    )


@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
def test_aConnectionBeyondTheLimitIsCountedRefused(mailgate_server):
    """
    With --max-connections 1, a second POP3 client is refused as it
    arrives: counted in mailgate_connections_refused_total with the
    reason, and neither as a session nor as an open connection.
    """
    server = mailgate_server(
        "--metrics", "tcp:0:interface=127.0.0.1", "--no-apop", "--max-connections", "1"
    )
    first = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
        poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    _, text = scrape(server)
    promtoolCheck(text)
    assert sample(text, "mailgate_connections_refused_total", protocol="pop3", reason="too_many") == 1
    assert sample(text, "mailgate_connections_refused_total", protocol="pop3", reason="banned") == 0
    assert sample(text, "mailgate_sessions_total", protocol="pop3") == 1
    assert sample(text, "mailgate_connections", protocol="pop3") == 1
    first.quit()


@postgresOnly
def test_aPostgresLoginsTripsToTheDatabaseAreMeasured(mailgate_server, mailgate_cli):
    """
    On PostgreSQL a POP3 login takes its maildrop's lock and reads the
    maildrop on a lock connection, and QUIT unlocks it there: those trips
    count in mailgate_database_seconds as the ones on worker threads do (a
    slow or failing lock connection showed in no metric).  QUIT's check
    that the lock is still held is made in its deletions' own write.
    """
    server = startScraped(mailgate_server)
    exercise(server, mailgate_cli)
    _, text = scrape(server)
    for operation in ("lockMaildrop", "readSnapshot", "unlockMaildrop", "removeMessages"):
        assert sample(text, "mailgate_database_seconds_count", operation=operation) == 1, operation
    assert sample(text, "mailgate_database_errors_total") == 0


@contextmanager
def usersTableLocked(database):
    """
    Another PostgreSQL client holds an exclusive lock on the users table,
    so that mailgate's reads of it wait.  (An embedded SQLite database in
    WAL mode cannot be held that way while the server has it open: its
    readers never wait.)
    """
    import psycopg

    from mailgate.store.postgres import _conninfo

    conn = psycopg.connect(_conninfo(database))
    conn.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    try:
        yield
    finally:
        conn.rollback()
        conn.close()


@postgresOnly
def test_healthFollowsTheDatabase(mailgate_server):
    server = mailgate_server("--metrics", "tcp:0:interface=127.0.0.1", "--no-apop")
    assert scrape(server, "/healthz") == (200, "ok\n")
    with usersTableLocked(server.database):
        status, text = scrape(server, "/healthz")
        assert status == 503
        assert text == "unavailable: the database did not answer within 1 s\n"
    waitFor(lambda: scrape(server, "/healthz") == (200, "ok\n"), "/healthz back at 200")


@pytest.mark.parametrize("databaseURL", ["sqlite"], indirect=True)
@pytest.mark.parametrize("cacheSize, hits", [(None, 2), ("0", 0)])
def test_authCacheSizeZeroHashesEveryLogin(mailgate_server, mailgate_cli, cacheSize, hits):
    """
    --auth-cache-size 0 (what the benchmarks' cold-login rows use): every
    login verifies the password hash again; by default the second and
    third logins are remembered ones.
    """
    options = ["--auth-cache-size", cacheSize] if cacheSize is not None else []
    server = mailgate_server("--metrics", "tcp:0:interface=127.0.0.1", "--no-apop", *options)
    mailgate_cli.addUser("alice@example.org", "secret")
    for _ in range(3):
        pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
        pop.user("alice@example.org")
        pop.pass_("secret")
        pop.quit()
    _, text = scrape(server)
    assert sample(text, "mailgate_logins_total", protocol="pop3", mechanism="user", result="ok") == 3
    assert sample(text, "mailgate_auth_cache_total", result="hit") == hits
    assert sample(text, "mailgate_auth_cache_total", result="miss") == 3 - hits
