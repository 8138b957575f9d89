"""
mailgate.service: the order of shutdown (listeners, then sessions, then
helpers, then the store), readiness, the health probe, SIGHUP actions, and
the log observer handed to twistd's application.
"""

import errno
import signal
import time

import pytest
from twisted.application.service import Application
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent

from mailgate.config import APOPPolicy, MailgateConfig
from mailgate.errors import ConfigurationError
from mailgate.logs import eventAsRecord
from mailgate.metrics import Metrics
from mailgate.service import ListeningService, ShuttingDown, StoreService, makeService
from mailgate.testing import memoryStore, resultOf


class ThreadCallsReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} that also takes calls from other threads (and
    from signal handlers): kept until L{runThreadCalls}, as a real reactor
    runs them on its next turn.
    """

    def __init__(self):
        super().__init__()
        self.threadCalls = []

    def callFromThread(self, function, *args, **kwargs):
        self.threadCalls.append((function, args, kwargs))

    def runThreadCalls(self):
        calls, self.threadCalls = self.threadCalls, []
        for function, args, kwargs in calls:
            function(*args, **kwargs)


def build(tmp_path, **kw):
    kw.setdefault("database", f"sqlite:///{tmp_path / 'service.sqlite3'}")
    kw.setdefault("apop", APOPPolicy.ALWAYS)
    kw.setdefault("pop3", ["tcp:1110"])
    kw.setdefault("smtp", ["tcp:2525"])
    kw.setdefault("metrics", "tcp:9101")
    reactor = ThreadCallsReactor()
    return makeService(MailgateConfig(**kw), reactor=reactor, store=memoryStore()), reactor


def recordStops(root, events):
    for service in root:
        stop = service.stopService
        if isinstance(service, ListeningService):
            name = service.protocolName
        elif isinstance(service, StoreService):
            name = "store"
        else:
            name = type(service).__name__

        def recorded(stop=stop, name=name):
            events.append(name)
            return stop()

        service.stopService = recorded


def test_stopOrder(tmp_path):
    root, reactor = build(tmp_path)
    events = []
    root.onStopping(lambda: events.append("stopping announced"))
    drained = defer.Deferred()

    def drainSessions():
        events.append("draining")
        return drained

    root.drainSessions = drainSessions
    recordStops(root, events)
    root.privilegedStartService()
    root.startService()
    stopped = root.stopService()
    # Announced first, then the mail listeners closed, then the sessions
    # are waited for: the metrics endpoint and the store are still up.
    assert events == ["stopping announced", "SMTP", "POP3", "draining"]
    assert not stopped.called
    assert root.listeners["METRICS"][0].running
    drained.callback(None)
    # Timers, the metrics endpoint and the store's background work (the
    # session registry, retention) go next (in reverse order of addition),
    # the store last.
    assert events[4:] == ["METRICS", "RegistryService", "RetentionService", "PolicyService", "MemoryTrimmer", "store"]
    assert resultOf(stopped) is None


def test_whenListening(tmp_path):
    root, reactor = build(tmp_path)
    ready = root.whenListening()
    assert not ready.called
    root.privilegedStartService()
    root.startService()
    try:
        assert ready.called
        assert {l.protocolName for ls in root.listeners.values() for l in ls} == {"POP3", "SMTP", "METRICS"}
        assert all(l.port is not None for ls in root.listeners.values() for l in ls)
    finally:
        root.stopService()


def test_anIPv6ListenerIsLoggedWithItsAddressInBrackets(logEvents):
    """
    The "listening on" line writes an IPv6 listener's address as every
    other line writes a peer's, C{[::1]:8080}: C{::1:8080}, as it was
    written, is itself an IPv6 address, with no port.
    """
    from twisted.internet.address import IPv6Address

    class Port:
        def getHost(self):
            return IPv6Address("TCP", "::1", 8080)

    description = "tcp6:8080:interface=\\:\\:1"
    ListeningService("POP3", description, None, None)._listening(Port())
    started = [e for e in logEvents if e.get("event") == "listener.started"]
    assert [formatEvent(e) for e in started] == [f"POP3 listening on [::1]:8080 ({description})"]
    assert eventAsRecord(started[0])["where"] == "[::1]:8080"


def test_databaseAnswers(tmp_path):
    root, reactor = build(tmp_path)
    root.startService()
    assert resultOf(root.databaseAnswers()) is None
    # A database that does not answer within the timeout.
    root.store.hasDomain = lambda domain: defer.Deferred()
    slow = []
    root.databaseAnswers(timeout=1.0).addBoth(slow.append)
    reactor.advance(0.9)
    assert slow == []
    reactor.advance(0.1)
    assert slow[0].check(defer.TimeoutError)
    root.stopService()
    # Once stopping, never healthy.
    stopping = []
    root.databaseAnswers().addBoth(stopping.append)
    assert stopping[0].check(ShuttingDown)


def test_metricsAreShared(tmp_path):
    metrics = Metrics()
    reactor = MemoryReactorClock()
    root = makeService(
        MailgateConfig(pop3=["tcp:1110"], smtp=["tcp:25"], lmtp=["tcp:24"], apop=False),
        reactor=reactor,
        store=memoryStore(),
        metrics=metrics,
    )
    assert root.metrics is metrics
    for name in ("POP3", "SMTP", "LMTP"):
        assert root.listeners[name][0].factory.metrics is metrics
    pop3 = root.listeners["POP3"][0].factory
    assert pop3.portal.passwordChecker.cache.metrics is metrics


def test_hangupActionsThenTLS(tmp_path):
    root, reactor = build(tmp_path)
    done = []
    root.onHangup(lambda: done.append("reopened"))
    root.onHangup(lambda: 1 / 0)
    root.onHangup(lambda: done.append("after a failing action"))
    root.reloadTLS = lambda: done.append("tls") or True
    root.hangup()
    assert done == ["reopened", "after a failing action", "tls"]


def _reloadableService(path, text, *arguments):
    """
    A service made as C{twistd mailgate --config path *arguments} makes it
    (on a memory reactor and store), C{path} holding C{text}, that a
    hangup reads again: the parsed options and the root service.
    """
    from mailgate.tap import Options

    path.write_text(text)
    options = Options()
    options.parseOptions(["--config", str(path), *arguments])
    root = makeService(options.toConfig(), reactor=MemoryReactorClock(), store=memoryStore())
    root.configSource = options.reread
    return options, root


def test_hangupReadsTheConfigurationFileAgain(tmp_path, logEvents):
    """
    With --config FILE, SIGHUP reads the file again under the same command
    line: which clients are traced (debug-peer, debug-user) changes at
    once for every protocol; another changed setting is named as taking
    effect at the next restart (and is not applied); a file that cannot
    be used is logged and changes nothing.
    """
    from twisted.internet.address import IPv4Address

    client = IPv4Address("TCP", "192.0.2.7", 40000)
    path = tmp_path / "mailgate.toml"
    options, root = _reloadableService(
        path, "max-recipients = 100\n", "--pop3", "tcp:1110", "--smtp", "tcp:2525", "--lmtp", "tcp:2424"
    )
    factories = [root.listeners[name][0].factory for name in ("POP3", "SMTP", "LMTP")]
    assert [f.trace for f in factories] == [None, None, None]

    def said(event):
        return [e for e in logEvents if e.get("event") == event]

    path.write_text('max-recipients = 100\ndebug-peer = ["192.0.2.0/24"]\ndebug-user = ["alice@example.org"]\n')
    root.hangup()
    assert all(f.trace.peer(client) and f.trace.user("alice@example.org") for f in factories)
    [reloaded] = said("config.reloaded")
    assert formatEvent(reloaded) == "configuration reloaded: applied debug-peer, debug-user"
    assert said("config.restart_needed") == []

    path.write_text('max-recipients = 5\nmin-data-rate = 5\nlog-format = "json"\n')
    root.hangup()
    assert [f.trace for f in factories] == [None, None, None]
    # max-recipients and min-data-rate are ones the factories give every
    # new session: applied.
    assert [f.maxRecipients for f in factories[1:]] == [5, 5]
    assert [f.minDataRate for f in factories[1:]] == [5, 5]
    [later] = said("config.restart_needed")
    assert formatEvent(later) == "configuration changed: log-format takes effect at the next restart"
    # hostname, which the mailgate command reads from the file at each run
    # (mailgate deliver, an MTA's pipe transport), is applied to the
    # sessions opened after it: nothing the pipe delivers with waits.
    path.write_text('max-recipients = 5\nmin-data-rate = 5\nlog-format = "json"\nhostname = "mail.example.org"\n')
    root.hangup()
    assert [f.hostname for f in factories] == ["mail.example.org"] * 3
    assert factories[0].sasl.hostname == "mail.example.org"
    [_, later] = said("config.restart_needed")
    assert formatEvent(later) == "configuration changed: log-format takes effect at the next restart"
    assert later["readByTheCommand"] == []
    # The JSON record carries the names as lists, not the sentence's parts.
    record = eventAsRecord(later)
    assert record["settings"] == ["log-format"]
    assert not {"names", "take", "readNow"} & set(record)

    path.write_text('debug-peer = ["192.0.2.0/24"]\nmax-recipients = "many"\n')
    root.hangup()
    [failed] = said("config.reload_failed")
    assert "max-recipients" in formatEvent(failed)
    assert formatEvent(failed).startswith("configuration reload failed, keeping the configuration in service")
    assert [f.trace for f in factories] == [None, None, None]
    path.unlink()
    root.hangup()
    assert len(said("config.reload_failed")) == 2


def test_aKeyOfTheFileTheCommandLineOverridesIsWarnedOf(tmp_path, logEvents):
    """
    The command line wins over the file at every reload: a change of a
    key it also gives did nothing, and the reload said only "nothing to
    apply" (the systemd unit gives --log-format on its command line).
    The start and each reload name such keys, those whose value differs.
    """
    from twisted.internet.address import IPv4Address

    from mailgate.tap import Options

    path = tmp_path / "mailgate.toml"
    path.write_text("max-recipients = 5\n")
    options = Options()
    options.parseOptions(["--config", str(path), "--max-recipients", "7", "--debug-peer", "192.0.2.0/24"])
    assert options.overriddenWarning() == (
        f"max-recipients in {path}: the command line gives it another value, which wins; the file's is not served"
    )
    root = makeService(options.toConfig(), reactor=MemoryReactorClock(), store=memoryStore())
    root.configSource = options.reread
    path.write_text('max-recipients = 7\ndebug-peer = ["198.51.100.0/24"]\n')
    root.hangup()
    assert [formatEvent(e) for e in logEvents if e.get("event") == "config.overridden"] == [
        f"debug-peer in {path}: the command line gives it another value, which wins; the file's is not served"
    ]
    [reloaded] = [formatEvent(e) for e in logEvents if e.get("event") == "config.reloaded"]
    assert reloaded == "configuration reloaded: nothing to apply"
    assert root.listeners["POP3"][0].factory.trace.peer(IPv4Address("TCP", "192.0.2.7", 1))
    path.write_text('debug-peer = ["192.0.2.0/24"]\n')
    root.hangup()
    assert len([e for e in logEvents if e.get("event") == "config.overridden"]) == 1


def test_aFileGivingTheDatabasesPasswordToEveryUserIsWarnedOfAtAReload(tmp_path, logEvents):
    """
    The configuration file's permissions were looked at at start alone: a
    file replaced since (mv of one written under the usual umask, 0644)
    handed every user of the machine the database's password, and the
    reload said only "nothing to apply".  Warned of at each reload too.
    """
    path = tmp_path / "mailgate.toml"
    text = 'database = "postgresql://mailgate:s3cret@db.internal/mail"\n'
    options, root = _reloadableService(path, text)
    path.chmod(0o640)
    root.hangup()
    assert [e for e in logEvents if e.get("event") == "config.file_permissions"] == []
    path.chmod(0o644)
    root.hangup()
    [warned] = [formatEvent(e) for e in logEvents if e.get("event") == "config.file_permissions"]
    assert warned == (
        f"the configuration file {path} holds the database's password, and every user of this machine may read "
        "it (mode 0644): chmod o-r it"
    )


def test_aReloadRefusesWhatTheNextRestartWouldRefuse(tmp_path, logEvents):
    """
    A spool directory that is not there, a certificate with another's key
    or a CPU that is not: config --check refuses them, and a start, but a
    reload took them "for the next restart" (which then failed, exit 78).
    Refused in the words of the start; a usable change is taken as ever.
    """
    from certs import makeCertificate

    path = tmp_path / "mailgate.toml"
    options, root = _reloadableService(path, "")
    certificate, _ = makeCertificate(tmp_path, "a.example.test")
    _, otherKey = makeCertificate(tmp_path, "b.example.test")

    def failures():
        return [formatEvent(e) for e in logEvents if e.get("event") == "config.reload_failed"]

    (tmp_path / "a-file").write_text("")
    for text, reason in [
        # What is not there said so: it was "... is not a directory".
        (
            f'spool-directory = "{tmp_path / "missing"}"\n',
            f"spool-directory: cannot spool messages in {tmp_path}/missing: {tmp_path}/missing does not exist",
        ),
        (
            f'spool-directory = "{tmp_path / "a-file"}"\n',
            f"spool-directory: cannot spool messages in {tmp_path}/a-file: {tmp_path}/a-file is not a directory",
        ),
        (f'tls-cert = "{certificate}"\ntls-key = "{otherKey}"\n', f"{otherKey} is not the key of {certificate}"),
        ('cpu-affinity = "4095"\n', "cpu-affinity: "),
    ]:
        path.write_text(text)
        root.hangup()
        assert reason in failures()[-1], (text, failures())
    assert len(failures()) == 4
    assert [e for e in logEvents if e.get("event") == "config.restart_needed"] == []
    path.write_text(f'spool-directory = "{tmp_path}"\n')
    root.hangup()
    [reloaded] = [formatEvent(e) for e in logEvents if e.get("event") == "config.reloaded"]
    assert reloaded == "configuration reloaded: applied spool-directory"


def test_aReloadRefusesAListenerTheNextStartCouldNotListenOn(tmp_path, logEvents):
    """
    A listener changed to a Unix socket in a directory that is not there
    (a mistyped path), or to a systemd socket this process was not given,
    was taken "for the next restart", which then exited 78 (cannot make
    the socket, or no such socket), while config --check said the file was
    right.  The running server refuses it at the reload, in words saying
    what to make; a socket in a directory that is there is taken for the
    restart as ever.
    """
    path = tmp_path / "mailgate.toml"
    options, root = _reloadableService(path, "")
    (tmp_path / "file").write_text("")

    def said(event):
        return [formatEvent(e) for e in logEvents if e.get("event") == event]

    for text, reason in [
        (
            f'lmtp = ["unix:{tmp_path}/missing/lmtp:mode=660"]\n',
            f"lmtp: a start could not listen on unix:{tmp_path}/missing/lmtp:mode=660: the directory "
            f"{tmp_path}/missing does not exist (make it, or correct the path)",
        ),
        (
            f'smtp = ["haproxy:unix:{tmp_path}/file/smtp"]\n',
            f"smtp: a start could not listen on haproxy:unix:{tmp_path}/file/smtp: {tmp_path}/file is not a "
            "directory (make it, or correct the path)",
        ),
        (
            f'metrics = "unix:{tmp_path}/file/sub/metrics"\n',
            f"metrics: a start could not listen on unix:{tmp_path}/file/sub/metrics: a part of {tmp_path}/file/sub "
            "is not a directory (make it, or correct the path)",
        ),
        # A socket systemd did not pass to this process (none, here): the
        # next start is passed the same ones (test_systemd has a process
        # given one).
        (
            'pop3 = ["systemd:domain=INET:name=pop3"]\n',
            "pop3: 'systemd:domain=INET:name=pop3': systemd passed no socket with that index or name (start "
            "mailgate through its socket unit, or use another endpoint)",
        ),
    ]:
        path.write_text(text)
        root.hangup()
        assert said("config.reload_failed")[-1].endswith(reason), said("config.reload_failed")
    assert len(said("config.reload_failed")) == 4 and said("config.restart_needed") == []
    path.write_text(f'lmtp = ["unix:{tmp_path}/lmtp"]\n')
    root.hangup()
    assert said("config.restart_needed") == ["configuration changed: lmtp takes effect at the next restart"]


def test_aReloadWarnsOfAChangedListenerTheRestartCouldNotBind(tmp_path, logEvents):
    """
    A listener changed to a port another process listens on, or to an
    address this machine does not have, was named as waiting for the
    restart alone, which then exited 1, retried by systemd every two
    seconds.  Warned of (config.listener_busy), not refused: the other
    process may be on its way out first.  A port this server listens on
    is its own, free by the restart.
    """
    import socket

    with socket.socket() as other, socket.socket() as ours:
        for s in (other, ours):
            s.bind(("127.0.0.1", 0))
            s.listen()
        busy, served = other.getsockname()[1], ours.getsockname()[1]
        path = tmp_path / "mailgate.toml"
        options, root = _reloadableService(path, f'pop3 = ["tcp:{served}:interface=127.0.0.1"]\n')
        path.write_text(
            f'pop3 = ["tcp:{served}:interface=127.0.0.1:backlog=50"]\n'
            f'smtp = ["tcp:{busy}:interface=127.0.0.1", "tcp:2525:interface=192.0.2.55", "tcp:0", '
            '"tcp:2526:interface=999.1.1.1"]\n'
        )
        root.hangup()
    warned = [formatEvent(e) for e in logEvents if e.get("event") == "config.listener_busy"]
    assert warned[:2] == [
        f"configuration changed: smtp tcp:{busy}:interface=127.0.0.1: port {busy} is in use by another process "
        "now: the restart could not listen there (exit 1, which systemd retries)",
        "configuration changed: smtp tcp:2525:interface=192.0.2.55: 192.0.2.55 is not an address of this "
        "machine: the restart could not listen there (exit 1, which systemd retries)",
    ]
    # One that is no address at all (mistyped): not warned of before.
    assert len(warned) == 3 and warned[2].startswith(
        "configuration changed: smtp tcp:2526:interface=999.1.1.1: 999.1.1.1 is not an address of this machine ("
    ), warned
    assert root.restartNeeded == ("pop3", "smtp") and not root.lastReloadFailed


def test_aReloadKeepsWhetherItFailedAndWhatWaitsForARestart(tmp_path):
    """
    What systemd's STATUS= says after a reload (test_systemd), and the
    metrics an alert watches: whether it failed in any part (the file, the
    certificates, the log file's reopening;
    mailgate_config_last_reload_successful), and which settings the file
    changes wait for a restart (a changed database too;
    mailgate_config_restart_needed), as the last reload that read the
    file found.
    """
    from certs import makeCertificate

    certificate, key = makeCertificate(tmp_path, "a.example.test")
    path = tmp_path / "mailgate.toml"
    tls = f'tls-cert = "{certificate}"\ntls-key = "{key}"\n'
    options, root = _reloadableService(path, tls)

    def metric(name, **labels):
        return root.metrics.registry.get_sample_value(name, labels)

    assert (root.lastReloadFailed, root.restartNeeded) == (False, ())
    assert metric("mailgate_config_last_reload_successful") == 1
    path.write_text(tls + 'log-format = "json"\n')
    root.hangup()
    assert (root.lastReloadFailed, root.restartNeeded) == (False, ("log-format",))
    assert metric("mailgate_config_restart_needed", setting="log-format") == 1
    path.write_text(tls + 'log-format = 5\n')
    root.hangup()
    assert (root.lastReloadFailed, root.restartNeeded) == (True, ("log-format",))
    assert metric("mailgate_config_last_reload_successful") == 0
    path.write_text(tls + f'database = "sqlite:///{tmp_path / "other.sqlite3"}"\n')
    root.hangup()
    assert (root.lastReloadFailed, root.restartNeeded) == (False, ("database",))
    assert metric("mailgate_config_last_reload_successful") == 1
    assert metric("mailgate_config_restart_needed", setting="database") == 1
    assert metric("mailgate_config_restart_needed", setting="log-format") is None
    path.write_text(tls)
    root.hangup()
    assert (root.lastReloadFailed, root.restartNeeded) == (False, ())
    assert metric("mailgate_config_restart_needed", setting="database") is None
    good = key.read_bytes()
    key.write_bytes(b"not a key")
    root.hangup()
    assert root.lastReloadFailed
    key.write_bytes(good)
    root.hangup()
    assert not root.lastReloadFailed
    root.onHangup(lambda: 1 / 0)
    root.hangup()
    assert root.lastReloadFailed


def test_aReloadWhoseLogFileWasNotReopenedFailed(tmp_path):
    """
    A SIGHUP whose log file could not be reopened (its directory gone, or
    no longer writable by the server's user) is a reload that failed, as
    README says of mailgate_config_last_reload_successful and systemd's
    status: lines go on to the old file, which logrotate compresses or
    removes.  The reopening logs its own error and raises nothing, so
    the service learns of it from its result (tap wires it so).
    """
    from mailgate import logs, tap

    _, root = _reloadableService(tmp_path / "mailgate.toml", "")
    directory = tmp_path / "logs"
    directory.mkdir()
    stream = logs.LogStream(str(directory / "mailgate.log"))
    root.onHangup(lambda: tap._reopenLog(stream))
    root.hangup()
    assert not root.lastReloadFailed
    directory.rename(tmp_path / "moved")
    root.hangup()
    assert root.lastReloadFailed
    assert root.metrics.registry.get_sample_value("mailgate_config_last_reload_successful") == 0
    directory.mkdir()
    root.hangup()
    assert not root.lastReloadFailed
    assert root.metrics.registry.get_sample_value("mailgate_config_last_reload_successful") == 1
    stream.close()


def test_aReloadTakesAnotherCertificateFileAndTLSSetting(tmp_path, logEvents):
    """
    tls-cert and tls-key changed to other files, or tls-min-version, take
    effect at the reload, as Dovecot's and Postfix's do: the listeners'
    TLS serves the new certificate and settings (before, they were named
    as taking effect at the next restart, and the old file stayed in
    service).  TLS turned on where it was off still needs a restart.
    """
    import ssl

    from certs import certificateFingerprint, makeCertificate

    first, firstKey = makeCertificate(tmp_path, "a.example.test")
    second, secondKey = makeCertificate(tmp_path, "b.example.test")
    path = tmp_path / "mailgate.toml"
    options, root = _reloadableService(
        path, f'tls-cert = "{first}"\ntls-key = "{firstKey}"\n', "--pop3s", "tcp:9995"
    )
    tls = root.tls
    assert root.listeners["POP3S"][0].factory.tls is tls
    path.write_text(f'tls-cert = "{second}"\ntls-key = "{secondKey}"\ntls-min-version = "1.3"\n')
    root.hangup()
    assert root.tls is tls and tls.fingerprint == certificateFingerprint(second)
    assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_3
    reloaded = [formatEvent(e) for e in logEvents if e.get("event") == "config.reloaded"]
    assert reloaded == ["configuration reloaded: applied tls-cert, tls-key, tls-min-version"]
    assert [e for e in logEvents if e.get("event") == "config.restart_needed"] == []
    # The new files are the ones reloaded from now on.
    makeCertificate(tmp_path, "c.example.test", name="b.example.test")
    root.hangup()
    assert tls.subject == "c.example.test"

    options, root = _reloadableService(tmp_path / "plain.toml", "")
    (tmp_path / "plain.toml").write_text(f'tls-cert = "{first}"\ntls-key = "{firstKey}"\n')
    root.hangup()
    assert root.tls is None
    [later] = [formatEvent(e) for e in logEvents if e.get("event") == "config.restart_needed"]
    assert later == "configuration changed: tls-cert, tls-key take effect at the next restart"


def test_theCertificatesInServiceAreInTheMetricsWithTheirEnd(tmp_path):
    """
    mailgate_tls_certificate_expiry_timestamp_seconds has the notAfter of
    each certificate in service, by subject and key type, from the start;
    a reload that serves other certificates replaces the series, so an
    alert on the time left watches what clients are given, not a
    certificate long replaced.
    """
    from certs import certificateFingerprint, makeCertificate

    def expiries(root):
        return {
            (sample.labels["subject"], sample.labels["key_type"], sample.labels["fingerprint"]): sample.value
            for family in root.metrics.registry.collect()
            if family.name == "mailgate_tls_certificate_expiry_timestamp_seconds"
            for sample in family.samples
        }

    first, firstKey = makeCertificate(tmp_path, "a.example.test", days=30)
    second, secondKey = makeCertificate(tmp_path, "b.example.test", days=90, keyType="rsa")
    path = tmp_path / "mailgate.toml"
    options, root = _reloadableService(
        path, f'tls-cert = "{first}"\ntls-key = "{firstKey}"\n', "--pop3s", "tcp:9995"
    )
    assert expiries(root) == {}
    root.startService()
    try:
        [(labels, end)] = expiries(root).items()
        assert labels == ("a.example.test", root.tls.certificates[0].keyType, certificateFingerprint(first))
        assert abs(end - (time.time() + 30 * 86400)) < 600
        path.write_text(f'tls-cert = "{second}"\ntls-key = "{secondKey}"\n')
        root.hangup()
        [(labels, end)] = expiries(root).items()
        assert labels == ("b.example.test", root.tls.certificates[0].keyType, certificateFingerprint(second))
        assert labels[1].startswith("RSA")
        assert abs(end - (time.time() + 90 * 86400)) < 600
    finally:
        root.stopService()


def test_aSpoolDirectoryThatCannotBeUsedStopsEveryStart(tmp_path):
    """
    config --check and a reload refuse a spool directory that is not
    there (and mailgate deliver spools in the file's), as the test above
    has it of a start: a server of POP3 alone started with it all the same
    (probe: twistd -n mailgate --spool-directory /nonexistent served), and
    every systemctl reload of that file then failed.  Refused whatever
    listens.
    """
    store = memoryStore()
    try:
        for listeners in ({"pop3": ["tcp:0:interface=127.0.0.1"]}, {"smtp": ["tcp:0:interface=127.0.0.1"]}):
            config = MailgateConfig(spoolDirectory=str(tmp_path / "missing"), **listeners)
            with pytest.raises(ConfigurationError, match=f"spool-directory: cannot spool messages in {tmp_path}"):
                makeService(config, reactor=MemoryReactorClock(), store=store)
    finally:
        store.close()


def test_aReloadRefusesAChangedDatabaseAsAnError(tmp_path, logEvents):
    """
    A file whose database changed is not one more setting "for the next
    restart": the mailgate command and mailgate deliver with the file use
    the new database at once, while the server serves the old one, so
    users added and mail delivered meanwhile go where it does not look.
    The reload says so as an error, the passwords hidden, and keeps the
    database it opened; other changes are named as ever.
    """
    from mailgate.tap import Options

    path = tmp_path / "mailgate.toml"
    old = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    options, root = _reloadableService(path, f'database = "{old}"\n')

    def said(event):
        return [formatEvent(e) for e in logEvents if e.get("event") == event]

    path.write_text('database = "postgresql://mailgate:s3cret@db.internal/mail"\nlog-format = "json"\n')
    root.hangup()
    [refused] = said("config.database_refused")
    assert refused.startswith(
        "configuration reload: the database changed to postgresql://mailgate:***@db.internal/mail; a running "
        f"server does not change databases and keeps serving {old} as it opened it until it is restarted"
    )
    assert [e["log_level"] for e in logEvents if e.get("event") == "config.database_refused"] == [LogLevel.error]
    assert "change" not in eventAsRecord([e for e in logEvents if e.get("event") == "config.database_refused"][0])
    assert said("config.restart_needed") == [
        "configuration changed: log-format takes effect at the next restart"
    ]
    assert root.config.database == old
    path.write_text(f'database = "{old}"\n')
    root.hangup()
    assert len(said("config.database_refused")) == 1
    options = Options()
    path.write_text('database = "postgresql://mailgate:s3cret@db.internal/mail"\n')
    options.parseOptions(["--config", str(path)])
    root = makeService(options.toConfig(), reactor=MemoryReactorClock(), store=memoryStore())
    root.configSource = options.reread
    path.write_text('database = "postgresql://mailgate:n3w@db.internal/mail"\n')
    root.hangup()
    assert said("config.database_refused")[-1].startswith(
        "configuration reload: the database URL's password changed; a running server does not change databases"
    )
    assert not [e for e in logEvents if "s3cret" in formatEvent(e) or "n3w" in formatEvent(e)]


def test_aReloadRefusesAFileTheServerWouldNotStartOn(tmp_path, logEvents):
    """
    A file that leaves nothing to listen on is refused at a reload as at
    start (and by config --check), not taken with "pop3 take effect at
    the next restart": a restart that would then fail.
    """
    path = tmp_path / "mailgate.toml"
    options, root = _reloadableService(path, 'pop3 = ["tcp:1110"]\n')
    path.write_text("pop3 = []\n")
    root.hangup()
    [failed] = [e for e in logEvents if e.get("event") == "config.reload_failed"]
    assert formatEvent(failed) == (
        "configuration reload failed, keeping the configuration in service: nothing to listen on: "
        f"pop3, pop3s, smtp and lmtp are all empty (in {path})"
    )
    assert [e for e in logEvents if e.get("event") == "config.restart_needed"] == []


def test_aHangupWithoutAConfigurationFileReadsNothing(tmp_path, logEvents):
    root, _ = build(tmp_path)
    assert root.reloadConfig() is None
    root.hangup()
    assert [e for e in logEvents if str(e.get("event", "")).startswith("config.")] == []


def test_sighupAndSigusr1AreHandledWhateverThereIsToReload(tmp_path):
    """
    Under twistd, SIGHUP and SIGUSR1 are always handled, also with no TLS
    and no log file of mailgate's (--syslog): their default action ends
    the process.  While stopping they are ignored (logged), and once
    stopped the handlers before ours are back.
    """
    before = {n: signal.getsignal(n) for n in (signal.SIGHUP, signal.SIGUSR1)}
    root, reactor = build(tmp_path, pop3=[], smtp=[], metrics=None, reloadOnSIGHUP=True)
    events = []
    root.log = Logger(observer=events.append)
    root.startService()
    try:
        for signum in before:
            assert signal.getsignal(signum) not in (signal.SIG_DFL, before[signum])
        root.hangup()
        assert [formatEvent(e) for e in events] == [
            "SIGHUP: nothing to reload (no TLS certificate, no log file of mailgate's, no configuration file)"
        ]
        # What a SIGHUP does while the service stops: said by the reactor,
        # not from inside the handler (which may interrupt a log write).
        root.onStopping(lambda: signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None))
        del events[:]
        resultOf(root.stopService())
        assert events == []
        reactor.runThreadCalls()
        assert [formatEvent(e) for e in events] == ["SIGHUP ignored: stopping"]
    finally:
        if root.running:
            root.stopService()
    assert {n: signal.getsignal(n) for n in before} == before


def test_logObserverBecomesTheApplications(tmp_path):
    root, reactor = build(tmp_path)
    events = []
    observer = events.append
    root.logObserver = observer
    application = Application("mailgate")
    root.setServiceParent(application)
    assert application.getComponent(ILogObserver) is observer
    # Without one, the application keeps whatever twistd chooses.
    other, _ = build(tmp_path)
    plain = Application("mailgate")
    other.setServiceParent(plain)
    assert plain.getComponent(ILogObserver) is None


def test_reloadSignalsAreHandledFromTheMomentTheListenersBind(tmp_path):
    """
    Under twistd the listeners bind (and say so) in privilegedStartService,
    before the reactor runs startService: a SIGHUP sent on seeing that
    line, by a script or logrotate, ended the process.  The handlers are
    in place from then on (the action waits for the reactor); a start-up
    that fails puts the previous handlers back.
    """
    before = {n: signal.getsignal(n) for n in (signal.SIGHUP, signal.SIGUSR1)}
    root, reactor = build(tmp_path, smtp=[], metrics=None, reloadOnSIGHUP=True)
    root.privilegedStartService()
    try:
        assert reactor.tcpServers, "the listener is bound"
        for signum in before:
            assert signal.getsignal(signum) not in (signal.SIG_DFL, before[signum])
        root.startService()
        resultOf(root.stopService())
    finally:
        if root.running:
            root.stopService()
    assert {n: signal.getsignal(n) for n in before} == before

    failing, _ = build(tmp_path, smtp=[], metrics=None, reloadOnSIGHUP=True)

    def cannotListen():
        raise ConfigurationError("cannot listen for POP3 on tcp:1110: in use")

    failing.listeners["POP3"][0].privilegedStartService = cannotListen
    with pytest.raises(ConfigurationError):
        failing.privilegedStartService()
    assert {n: signal.getsignal(n) for n in before} == before


class BusyPortReactor(ThreadCallsReactor):
    """
    A memory reactor on which the TCP ports of C{busy} are taken by
    another process, and which knows which ports are listening.
    """

    def __init__(self, busy=()):
        super().__init__()
        self.busy = set(busy)
        self.listening = set()

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "Address already in use"))
        bound = super().listenTCP(port, factory, backlog, interface)
        self.listening.add(port)
        bound.stopListening = lambda: self.listening.discard(port)
        return bound


def failureOf(d):
    """
    The failure C{d} has fired with (and consumed), or C{None}.
    """
    failures = []
    d.addErrback(failures.append)
    return failures[0] if failures else None


def sqliteService(tmp_path, reactor, **kw):
    """
    A service over a real SQLite file (so its server claim is real), with
    POP3 on port 1110 and SMTP on 2525.
    """
    kw.setdefault("pop3", ["tcp:1110"])
    kw.setdefault("smtp", ["tcp:2525"])
    config = MailgateConfig(database=f"sqlite:///{tmp_path / 'claimed.sqlite3'}", **kw)
    return makeService(config, reactor=reactor)


def test_aSettingRefusedOnceTheDatabaseIsOpenLeavesItUnclaimed(tmp_path):
    """
    An embedding application whose makeService call is refused a setting
    checked after the store is open (the spool directory) corrects it and
    calls again: the database is its own, not "in use by another mailgate
    server" (the first call's claim, never given back).
    """
    with pytest.raises(ConfigurationError, match="spool-directory"):
        sqliteService(tmp_path, BusyPortReactor(), spoolDirectory=str(tmp_path / "missing"))
    root = sqliteService(tmp_path, BusyPortReactor())
    resultOf(root.stopService())


@pytest.mark.parametrize("privileged", [True, False], ids=["privilegedStartService", "startService"])
def test_aListenerThatCannotBindLeavesNothingBehind(tmp_path, privileged):
    """
    SMTP's port is taken: the embedding application gets the
    ConfigurationError, and nothing of mailgate's is left holding a port
    or the database: the POP3 listener that bound before it stops
    listening (it accepted connections for a server that had failed to
    start), the services already started stop, the store closes, and the
    signal handlers before ours are back.  A corrected configuration then
    starts in the same process.  Started either way an application
    starts its services: under twistd (privilegedStartService first) or
    by startService alone.
    """
    before = {n: signal.getsignal(n) for n in (signal.SIGHUP, signal.SIGUSR1)}
    reactor = BusyPortReactor(busy={2525})
    root = sqliteService(tmp_path, reactor, reloadOnSIGHUP=True, metrics="tcp:9101")
    ready = root.whenListening()
    each = {name: ls[0].whenListening() for name, ls in root.listeners.items()}
    with pytest.raises(ConfigurationError, match="cannot listen for SMTP on tcp:2525"):
        if privileged:
            root.privilegedStartService()
        else:
            root.startService()
    assert reactor.listening == set()
    # Waiting for the listeners ends: they will never all listen.
    assert failureOf(ready).value.subFailure.check(ConfigurationError, ShuttingDown)
    assert failureOf(each["SMTP"]).check(ConfigurationError)
    assert failureOf(each["METRICS"]).check(ShuttingDown)
    assert resultOf(each["POP3"]).getHost().port == 1110
    assert not root.running
    assert [s for s in root if s.running] == []
    assert {n: signal.getsignal(n) for n in before} == before
    # Once stopped, it is done with: a new one takes its place.
    with pytest.raises(RuntimeError, match="cannot start again"):
        root.startService()
    assert reactor.listening == set()
    corrected = sqliteService(tmp_path, reactor, smtp=["tcp:2526"])
    corrected.privilegedStartService()
    corrected.startService()
    assert reactor.listening == {1110, 2526}
    resultOf(corrected.stopService())
    assert reactor.listening == set()


def test_aStoppedServiceRefusesToStartAgain(tmp_path):
    """
    Its store closed at the stop, a service started again listened and
    answered every session with "the database is closed": refused, saying
    to make a new one.
    """
    reactor = BusyPortReactor()
    root = sqliteService(tmp_path, reactor)
    root.privilegedStartService()
    root.startService()
    resultOf(root.stopService())
    assert reactor.listening == set()
    for start in (root.privilegedStartService, root.startService):
        with pytest.raises(RuntimeError, match="make a new one with mailgate.service.makeService"):
            start()
        assert reactor.listening == set()


def test_twoServicesReloadingOnSIGHUPLeaveEachOtherTheirHandlers(tmp_path):
    """
    Two services of one application, each reloading on SIGHUP: the first
    one stopped put back the handler from before them both and took the
    second's away, so the next SIGHUP ended the process.  Each now keeps
    its own until it stops; while one drains, the other still reloads; the
    handlers from before come back with the last one stopped.
    """
    before = {n: signal.getsignal(n) for n in (signal.SIGHUP, signal.SIGUSR1)}
    first, firstReactor = build(tmp_path, pop3=[], smtp=[], metrics=None, reloadOnSIGHUP=True)
    second, secondReactor = build(tmp_path, pop3=[], smtp=[], metrics=None, reloadOnSIGHUP=True)
    hangups = []
    first.onHangup(lambda: hangups.append("first"))
    second.onHangup(lambda: hangups.append("second"))

    def sighup():
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
        firstReactor.runThreadCalls()
        secondReactor.runThreadCalls()

    first.startService()
    second.startService()
    try:
        sighup()
        assert hangups == ["first", "second"]
        del hangups[:]
        drained = defer.Deferred()
        first.drainSessions = lambda: drained
        stopped = first.stopService()
        sighup()
        assert hangups == ["second"]
        drained.callback(None)
        resultOf(stopped)
        sighup()
        assert hangups == ["second", "second"]
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, before[signal.SIGUSR1])
    finally:
        for root in (first, second):
            if root.running:
                resultOf(root.stopService())
    assert {n: signal.getsignal(n) for n in before} == before


def test_aServiceStoppedBetweenItsTwoStartsClosesItsPorts(tmp_path):
    """
    The listeners bind in privilegedStartService, before startService
    (twistd's order, an application's too): an application that stopped
    the service between the two (another of its services failed to
    start) left mailgate's ports accepting connections, with the store
    closed behind them.
    """
    reactor = BusyPortReactor()
    root = sqliteService(tmp_path, reactor)
    root.privilegedStartService()
    assert reactor.listening == {1110, 2525}
    resultOf(root.stopService())
    assert reactor.listening == set()


@pytest.mark.parametrize("how", ["start failed", "stopped before it started"])
def test_waitingForListenersThatNeverWillEndsWhenAskedLate(tmp_path, how):
    """
    A wait for the listeners asked for only once they never will listen
    (the start failed on a port in use; the service was stopped before it
    started) fails at once, as one asked before does: it was a Deferred
    that never fired, and an embedding application waiting on
    C{root.whenListening()} after catching the L{ConfigurationError}
    waited for ever.
    """
    reactor = BusyPortReactor(busy={2525})
    root = sqliteService(tmp_path, reactor, metrics="tcp:9101")
    if how == "start failed":
        with pytest.raises(ConfigurationError):
            root.startService()
    else:
        resultOf(root.stopService())
    each = {name: ls[0].whenListening() for name, ls in root.listeners.items()}
    assert each["SMTP"].called and each["METRICS"].called
    assert failureOf(each["METRICS"]).check(ShuttingDown)
    if how == "start failed":
        assert failureOf(each["SMTP"]).check(ConfigurationError)
        # POP3 bound before SMTP failed, and was closed when the start was
        # given up: no port to give (it gave the closed one).
        assert failureOf(each["POP3"]).check(ShuttingDown)
    else:
        assert failureOf(each["SMTP"]).check(ShuttingDown)
        assert failureOf(each["POP3"]).check(ShuttingDown)
    failed = failureOf(root.whenListening())
    assert failed is not None and failed.value.subFailure.check(ConfigurationError, ShuttingDown)


def test_aListenerStoppedAfterItListenedGivesNoClosedPort(tmp_path):
    """
    Once stopped, a listener that was bound has no port to give: a wait
    asked for then fails (ShuttingDown) instead of firing with the closed
    port, as if it took connections; a wait asked for while it listened
    had the port.
    """
    reactor = BusyPortReactor(busy=set())
    root = sqliteService(tmp_path, reactor, metrics="tcp:9101")
    root.startService()
    [pop3] = root.listeners["POP3"]
    assert resultOf(pop3.whenListening()).getHost().port == 1110
    resultOf(root.stopService())
    assert pop3.port is None
    assert failureOf(pop3.whenListening()).check(ShuttingDown)
    assert failureOf(root.whenListening()).value.subFailure.check(ShuttingDown)


def test_aSecondStopWaitsForTheFirstInsteadOfRunningItsOwn(tmp_path):
    """
    stopService called again while a stop is under way (an application
    that stopped mailgate itself, then its own stop at the process's end,
    which stops every child again; disownServiceParent; a second SIGTERM's
    stop) waits for that stop.  It ran a stop of its own: finding the
    helpers already stopping, it closed the store at once, under the
    retention task and the session registry the first stop was still
    waiting for ("leaving the session registry: the database is closed",
    a CancelledError logged as a service that failed to stop), and its
    Deferred fired before they were done.
    """
    root, reactor = build(tmp_path)
    events = []
    recordStops(root, events)
    held = defer.Deferred()
    retention = next(s for s in root if type(s).__name__ == "RetentionService")
    recorded = retention.stopService

    def stopSlowly():
        recorded()
        return held

    retention.stopService = stopSlowly
    root.privilegedStartService()
    root.startService()
    first = root.stopService()
    second = root.stopService()
    assert "RetentionService" in events
    assert "store" not in events
    assert not first.called and not second.called
    held.callback(None)
    assert events.count("store") == 1 and events[-1] == "store"
    assert resultOf(first) is None and resultOf(second) is None
    # Once stopped, a stop is over at once, and stops nothing again.
    count = len(events)
    assert resultOf(root.stopService()) is None
    assert len(events) == count


def test_anEmbeddedServiceLeavesTheProcessesLogsAndMetricsAlone(tmp_path):
    """
    What README's Embedding says of the process an embedded mailgate runs
    in: started and stopped, it registers nothing in prometheus_client's
    default registry (a host exporting it sees none of mailgate's series
    unasked), adds no log observer or standard logging handler, leaves the
    umask and sys.excepthook; and the README's way for a host to export
    mailgate's series from a registry of its own (the mailgate_* ones:
    the whole registry repeats the process's series) works.
    """
    import logging
    import os
    import sys

    import prometheus_client
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
    from twisted.logger import globalLogPublisher

    def processState():
        umask = os.umask(0o022)
        os.umask(umask)
        return (
            {m.name for m in prometheus_client.REGISTRY.collect()},
            list(logging.getLogger().handlers),
            list(globalLogPublisher._observers),
            sys.excepthook,
            umask,
        )

    before = processState()
    root, reactor = build(tmp_path)
    root.privilegedStartService()
    root.startService()
    assert processState() == before
    resultOf(root.stopService())
    assert processState() == before

    # A registry as prometheus_client's default one is made.
    host = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=host)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        host.register(root.metrics.registry)

    class MailgateSeries:
        def collect(self):
            return [m for m in root.metrics.registry.collect() if m.name.startswith("mailgate_")]

    host.register(MailgateSeries())
    exposition = generate_latest(host).decode()
    assert "\nmailgate_connections_limit " in exposition
    assert exposition.count("# TYPE process_open_fds ") == 1


def test_aListenerRefusedItsSocketFileForGoodExitsAsAConfigurationError():
    """
    The exit status of a start whose listener could not start
    (_listenFailureStatus): 78 (EX_CONFIG, which the systemd unit does not
    retry) when trying again cannot work: the port or the socket's
    directory refused to the user, from the bind (Twisted's
    CannotListenError) or from a Unix socket's lock file (an OSError of its
    own, which exited 1), or a read-only file system (EROFS: a socket's
    directory outside the unit's ReadWritePaths=, which exited 1); 1 for
    what may pass (a port still in use, an address not yet up).
    """
    from mailgate.service import _listenFailureStatus

    def failed(cause):
        try:
            raise ConfigurationError("cannot listen") from cause
        except ConfigurationError as e:
            return _listenFailureStatus(e)

    def bind(number):
        return CannotListenError("", "/run/mailgate/lmtp", OSError(number, "refused"))

    assert failed(bind(errno.EACCES)) == 78
    assert failed(bind(errno.EROFS)) == 78
    assert failed(PermissionError(errno.EACCES, "Permission denied")) == 78
    assert failed(OSError(errno.EROFS, "Read-only file system")) == 78
    assert failed(bind(errno.EADDRINUSE)) == 1
    assert failed(bind(errno.EADDRNOTAVAIL)) == 1
    # A socket's directory not there: 78 since, as for a missing directory
    # trying again does not make it (see the test below).
    assert failed(OSError(errno.ENOENT, "No such file or directory")) == 78
    assert failed(OSError(errno.ECONNREFUSED, "Connection refused")) == 1


@pytest.mark.parametrize("lockfile", ["", ":lockfile=0"])
def test_aUnixSocketWhoseDirectoryIsMissingIsAConfigurationErrorSaidInPlainWords(tmp_path, lockfile):
    """
    A Unix socket in a directory that does not exist (a mistyped path, or
    one no unit makes: under systemd the unit's RuntimeDirectory= is made
    before the start) cannot start by trying again: exit 78, as a directory
    the user may not write (d3040c5), where it was 1 and systemd started the
    server again every two seconds for ever.  The reason names the file and
    the missing directory: with Twisted's lock file (the default) it was
    the bare symlink error, "[Errno 2] No such file or directory: '21967'
    -> b'.../lmtp.lock'", and without it "Couldn't listen on any:b'...'".
    A path through a regular file (ENOTDIR) is 78 too.
    """
    from twisted.internet import reactor

    from mailgate.service import _listenFailureStatus
    from mailgate.session.endpoints import serverEndpoint

    def failure(path):
        description = f"unix:{path}{lockfile}"
        listener = ListeningService("LMTP", description, serverEndpoint(reactor, description), Factory())
        with pytest.raises(ConfigurationError) as e:
            listener.privilegedStartService()
        return str(e.value), _listenFailureStatus(e.value)

    missing = tmp_path / "run" / "mailgate"
    made = "socket's lock file" if not lockfile else "socket"
    suffix = ".lock" if not lockfile else ""
    assert failure(missing / "lmtp") == (
        f"cannot listen for LMTP on unix:{missing / 'lmtp'}{lockfile}: cannot make the {made} "
        f"{missing / 'lmtp'}{suffix}: No such file or directory (the directory {missing} does not exist: "
        "make it, or correct the path)",
        78,
    )
    (tmp_path / "file").write_text("")
    reason, status = failure(tmp_path / "file" / "lmtp")
    assert status == 78
    assert reason.endswith(f": Not a directory (a part of {tmp_path / 'file'} is not a directory: correct the path)")


@pytest.mark.parametrize("hostname", [None, "mail.example.org"])
def test_theNodeIsNamedByItsHostNameAndTheProcessServing(tmp_path, monkeypatch, hostname):
    """
    A node's name in C{mailgate nodes} and C{who} is its C{--hostname}
    (by default the machine's FQDN, as the greetings say it) and the id
    of the process serving, taken as the service starts, after twistd
    has forked into a daemon.  Without C{--hostname} (README's nodes'
    command) it was the short host name and the id of the process twistd
    had forked away from: a daemonized node was listed as C{vm[28781]}
    while its pid file said 28810.
    """
    import os

    from mailgate.hostname import machineName
    from mailgate.store.housekeeping import RegistryService

    root, reactor = build(tmp_path, hostname=hostname)
    [registry] = [service for service in root if isinstance(service, RegistryService)]
    daemon = os.getpid() + 1
    monkeypatch.setattr(os, "getpid", lambda: daemon)
    registry.startService()
    assert registry._store.sessions.name == f"{hostname or machineName()}[{daemon}]"
