"""
mailgate.systemd: notifications to a datagram socket the test made (READY=1
after the ports answer, STATUS=, STOPPING=1 on SIGTERM, WATCHDOG=1), the
abstract namespace, socket activation through a systemd: endpoint, and the
shipped units.
"""

import configparser
import pathlib
import poplib
import signal
import socket
import sys
import time

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from e2e import DEADLINE, ServerProcess, databaseURL, waitFor
from mailgate import systemd
from mailgate.metrics import Metrics

REPO = pathlib.Path(__file__).resolve().parent.parent
UNITS = REPO / "contrib" / "systemd"


class NotifySocket:
    """
    The test's end of $NOTIFY_SOCKET: a bound datagram socket.
    """

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages = []

    def receive(self, timeout=DEADLINE):
        """
        The next datagram's lines, or C{None} after C{timeout} seconds.
        """
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        lines = data.decode("utf-8").split("\n")
        self.messages.append(lines)
        return lines

    def waitFor(self, line, timeout=DEADLINE, server=None):
        """
        Receive until a datagram holds C{line}; return that datagram.  With
        C{server}, give up as soon as it exited.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (server is not None and not server.running()):
                log = server.log() if server is not None else ""
                pytest.fail(f"no {line!r} within {timeout} s; received {self.messages}\n{log}")
            lines = self.receive(min(left, 0.5))
            if lines is not None and line in lines:
                return lines

    def close(self):
        self.sock.close()


@pytest.fixture
def notifySocket(tmp_path):
    sock = NotifySocket(str(tmp_path / "notify"))
    yield sock
    sock.close()


# -- the notifier -----------------------------------------------------------------


def test_notifierSendsOneDatagram(notifySocket):
    notifier = systemd.Notifier.fromEnvironment({"NOTIFY_SOCKET": notifySocket.sock.getsockname()})
    try:
        assert notifier.notify("READY=1", "STATUS=serving")
        assert notifySocket.receive() == ["READY=1", "STATUS=serving"]
    finally:
        notifier.close()


def test_abstractNamespace():
    name = f"mailgate-test-{time.monotonic_ns()}"
    sock = NotifySocket("\0" + name)
    notifier = systemd.Notifier.fromEnvironment({"NOTIFY_SOCKET": "@" + name})
    try:
        assert notifier.notify("WATCHDOG=1")
        assert sock.receive() == ["WATCHDOG=1"]
    finally:
        notifier.close()
        sock.close()


def test_noSocketNoNotifier():
    assert systemd.Notifier.fromEnvironment({}) is None
    assert systemd.Notifier.fromEnvironment({"NOTIFY_SOCKET": ""}) is None


def test_systemdGoneIsNotAnError(tmp_path):
    notifier = systemd.Notifier(str(tmp_path / "nobody-listens"))
    try:
        assert notifier.notify("READY=1") is False
        assert notifier.notify("STOPPING=1") is False
    finally:
        notifier.close()


def fillQueue(address):
    """
    Fill the receive queue of the datagram socket at C{address}, as other
    services' notifications fill systemd's while it is busy (a
    daemon-reload): until a new sender's first datagram finds no room.
    Several senders, as one alone may run out of its own send buffer first.

    @return: the senders, to be closed once the queue is read.
    """
    senders = []
    for _ in range(256):
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setblocking(False)
        senders.append(sender)
        try:
            for _ in range(4096):
                sender.sendto(b"X_OTHER=1", address)
        except BlockingIOError:
            pass
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        probe.setblocking(False)
        try:
            probe.sendto(b"X_OTHER=1", address)
        except BlockingIOError:
            return senders
        finally:
            probe.close()
    pytest.fail("the queue never filled")


def test_aNotificationSystemdHadNoRoomForIsSentOnceItHas(notifySocket):
    """
    systemd's notification socket is full for a moment (PID 1 busy with a
    daemon-reload while every service pings it): what found no room is sent
    again, in order, once there is.  It was dropped (sd_notify(3) blocks
    instead): a READY=1 lost so left the unit starting until its
    TimeoutStartSec killed a server that was serving; a STOPPING=1 lost,
    the sessions' grace cut short by TimeoutStopSec.
    """
    clock = Clock()
    notifier = systemd.Notifier(notifySocket.sock.getsockname())
    notifier.retryOn(clock)
    senders = fillQueue(notifySocket.sock.getsockname())
    try:
        assert notifier.notify("READY=1", "STATUS=serving") is False
        assert notifier.notify("WATCHDOG=1") is False
        # Still no room: kept, not lost.
        clock.advance(systemd.RETRY_EVERY)
        while notifySocket.receive(timeout=0.05) == ["X_OTHER=1"]:
            pass
        clock.advance(systemd.RETRY_EVERY)
        assert notifySocket.receive(timeout=1) == ["READY=1", "STATUS=serving"]
        assert notifySocket.receive(timeout=1) == ["WATCHDOG=1"]
        assert clock.getDelayedCalls() == []
        # Room again: sent at once.
        assert notifier.notify("STOPPING=1") is True
        assert notifySocket.receive(timeout=1) == ["STOPPING=1"]
    finally:
        notifier.close()
        for sender in senders:
            sender.close()


def test_watchdogInterval():
    assert systemd.watchdogInterval({}) is None
    assert systemd.watchdogInterval({"WATCHDOG_USEC": "30000000"}, pid=42) == 15.0
    assert systemd.watchdogInterval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42) == 15.0
    # Watching another process: not ours to ping.
    assert systemd.watchdogInterval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, pid=42) is None
    assert systemd.watchdogInterval({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdogInterval({"WATCHDOG_USEC": "soon"}) is None


def test_describeSessions():
    assert systemd.describeSessions({"pop3": 2, "smtp": 1, "lmtp": 0}) == "3 sessions (lmtp 0, pop3 2, smtp 1)"
    assert systemd.describeSessions({"pop3": 1}) == "1 session (pop3 1)"


# -- the service, on a clock -------------------------------------------------------------


class RecordingNotifier:
    def __init__(self):
        self.sent = []

    def notify(self, *lines):
        self.sent.append(list(lines))
        return True

    def retryOn(self, clock):
        pass


class Root:
    """
    The parts of MailgateService the notifications use, driven by the test.
    """

    def __init__(self):
        self.metrics = Metrics()
        self.listening = defer.Deferred()
        self.answers = []
        self.stopping = []

    def whenListening(self):
        return self.listening

    def databaseAnswers(self):
        d = defer.Deferred()
        self.answers.append(d)
        return d

    def onStopping(self, callback):
        self.stopping.append(callback)

    def onReload(self, begins, ends):
        self.reloads = (begins, ends)


def test_readyOnlyOnceListeningAndTheDatabaseAnswered():
    clock, root, notifier = Clock(), Root(), RecordingNotifier()
    service = systemd.SystemdService(root, notifier, clock, watchdog=None)
    service.startService()
    assert notifier.sent == [["STATUS=starting"]]
    assert root.answers == []
    root.listening.callback(None)
    # Bound, but the database has not answered: not ready; retried.
    root.answers[0].errback(TimeoutError("the database did not answer within 1 s"))
    assert not service.ready
    assert notifier.sent[-1] == ["STATUS=waiting for the database (TimeoutError; the log says why)"]
    clock.advance(systemd.READY_RETRY)
    root.answers[1].callback(None)
    assert service.ready
    assert notifier.sent[-1] == ["READY=1", "STATUS=serving: 0 sessions (lmtp 0, pop3 0, smtp 0)"]
    # STATUS follows the sessions, sent when it changes.
    sent = len(notifier.sent)
    clock.advance(systemd.STATUS_INTERVAL)
    assert len(notifier.sent) == sent
    root.metrics.connectionOpened("pop3")
    root.metrics.connectionOpened("smtp")
    clock.advance(systemd.STATUS_INTERVAL)
    assert notifier.sent[-1] == ["STATUS=serving: 2 sessions (lmtp 0, pop3 1, smtp 1)"]
    # Shutdown: STOPPING=1 first, when the root starts stopping.
    for callback in root.stopping:
        callback()
    assert notifier.sent[-1] == ["STOPPING=1", "STATUS=stopping: 2 sessions (lmtp 0, pop3 1, smtp 1)"]
    service.stopService()
    assert notifier.sent.count(["STOPPING=1", "STATUS=stopping: 2 sessions (lmtp 0, pop3 1, smtp 1)"]) == 1
    assert clock.getDelayedCalls() == []


def test_theLogSaysReadyWasToldOnlyWhenItWas(tmp_path, logEvents):
    """
    "told systemd READY=1" is logged once systemd's socket took it: with
    the socket gone, the line came all the same, after the notifier's
    warning (walked with NOTIFY_SOCKET naming no socket); a READY=1 that
    waits for room in a full socket says it waits.
    """
    from twisted.logger import formatEvent

    def said(events):
        return [(e["log_level"].name, e["event"], formatEvent(e)) for e in events if e.get("event", "").startswith("systemd.")]

    clock, root = Clock(), Root()
    notifier = systemd.Notifier(str(tmp_path / "nobody-listens"))
    service = systemd.SystemdService(root, notifier, clock, watchdog=None)
    try:
        service.startService()
        root.listening.callback(None)
        root.answers[0].callback(None)
        assert service.ready
        assert said(logEvents) == [
            ("warn", "systemd.notify_failed", f"cannot notify systemd at {tmp_path / 'nobody-listens'}: [Errno 2] No such file or directory"),
            ("warn", "systemd.notify_failed", f"systemd was not told READY=1: its notification socket {tmp_path / 'nobody-listens'} could not be written to"),
        ]
        service.stopService()
    finally:
        notifier.close()

    class Full(RecordingNotifier):
        waiting = True

        def notify(self, *lines):
            return False

    del logEvents[:]
    clock, root = Clock(), Root()
    service = systemd.SystemdService(root, Full(), clock, watchdog=None)
    service.startService()
    root.listening.callback(None)
    root.answers[0].callback(None)
    assert said(logEvents) == [
        ("info", "systemd.ready", "READY=1 waits for room in systemd's notification socket (PID 1 busy): told once there is")
    ]
    service.stopService()


def test_stoppingGivesSystemdTheTimeTheGraceNeeds(tmp_path):
    """
    STOPPING=1 comes with EXTEND_TIMEOUT_USEC: the shutdown grace and a
    margin.  The unit's TimeoutStopSec (45 s) SIGKILLed a server whose
    --shutdown-grace was longer in the middle of its sessions' grace.
    """
    from mailgate.service import MailgateConfig, makeService

    config = MailgateConfig(
        database=f"sqlite:///{tmp_path / 'db.sqlite3'}", pop3=["tcp:1110:interface=127.0.0.1"],
        shutdownGrace=120,
    )
    from twisted.internet.testing import MemoryReactorClock

    clock, notifier = MemoryReactorClock(), RecordingNotifier()
    root = makeService(config, reactor=clock)
    service = systemd.SystemdService(root, notifier, clock, watchdog=None)
    service.shutdownBegins()
    [stopping] = [lines for lines in notifier.sent if lines[0] == "STOPPING=1"]
    [extend] = [line for line in stopping if line.startswith("EXTEND_TIMEOUT_USEC=")]
    # The grace, the sessions' abort delay, and the stop's bounds after them:
    # 10 s for the services, 10 s for the store's threads (both waited for
    # in full when the database hangs), 2 s for the rest.
    assert int(extend.split("=")[1]) == (120 + root.sessions.abortDelay + 22) * 1_000_000
    root.store.close()


def test_theLongestGraceIsAStopSystemdCanBeTold(tmp_path):
    """
    --shutdown-grace took any number: past about 1e13 seconds the
    EXTEND_TIMEOUT_USEC= was more than the unsigned 64-bit number systemd
    reads, so it ignored the line and killed the server at TimeoutStopSec.
    The grace is now at most a week (19ea267), refused beyond, and the
    longest one is told to systemd as it is.
    """
    from twisted.internet.testing import MemoryReactorClock

    from mailgate.errors import ConfigurationError
    from mailgate.service import MailgateConfig, makeService

    def configured(grace):
        return MailgateConfig(
            database=f"sqlite:///{tmp_path / 'db.sqlite3'}", pop3=["tcp:1110:interface=127.0.0.1"],
            shutdownGrace=grace,
        )

    with pytest.raises(ConfigurationError, match="at most 604800"):
        makeService(configured(1e300), reactor=MemoryReactorClock())
    clock, notifier = MemoryReactorClock(), RecordingNotifier()
    root = makeService(configured(604800), reactor=clock)
    try:
        systemd.SystemdService(root, notifier, clock, watchdog=None).shutdownBegins()
        [stopping] = [lines for lines in notifier.sent if lines[0] == "STOPPING=1"]
        [extend] = [line for line in stopping if line.startswith("EXTEND_TIMEOUT_USEC=")]
        assert int(extend.split("=")[1]) == (604800 + root.sessions.abortDelay + 22) * 1_000_000
        assert int(extend.split("=")[1]) < systemd.USEC_INFINITY
    finally:
        root.store.close()


def test_whileWaitingForTheDatabaseStatusNamesTheErrorsKindOnly():
    """
    STATUS= is readable by every local user (systemctl status): while the
    database refuses, it says what kind of error keeps the server from
    being ready, not the error's text, which names the database server's
    host and the role (libpq's words); the log has the whole error.
    """
    from mailgate.errors import DatabaseRefused

    clock, root, notifier = Clock(), Root(), RecordingNotifier()
    service = systemd.SystemdService(root, notifier, clock, watchdog=None)
    service.startService()
    root.listening.callback(None)

    class OperationalError(Exception):
        sqlstate = "28P01"

    text = (
        'connection to server at "db.internal" (10.0.0.5), port 5432 failed: '
        'FATAL:  password authentication failed for user "mailgate_role"'
    )
    try:
        try:
            raise OperationalError(text)
        except OperationalError as e:
            raise DatabaseRefused(f"the database refused mailgate: {e}") from e
    except DatabaseRefused as refused:
        root.answers[0].errback(refused)
    [status] = notifier.sent[-1]
    assert status == "STATUS=waiting for the database (DatabaseRefused, OperationalError, SQLSTATE 28P01; the log says why)"
    assert "db.internal" not in status and "mailgate_role" not in status
    service.stopService()


def test_watchdogWhileTheReactorRuns():
    clock, root, notifier = Clock(), Root(), RecordingNotifier()
    service = systemd.SystemdService(root, notifier, clock, watchdog=5.0)
    service.startService()
    clock.advance(5.0)
    clock.advance(5.0)
    assert notifier.sent.count(["WATCHDOG=1"]) == 3
    service.stopService()
    clock.advance(5.0)
    assert notifier.sent.count(["WATCHDOG=1"]) == 3


def test_stoppingBeforeReadyIsNeverReady():
    clock, root, notifier = Clock(), Root(), RecordingNotifier()
    service = systemd.SystemdService(root, notifier, clock)
    service.startService()
    service.stopService()
    root.listening.callback(None)
    assert not service.ready
    assert ["READY=1"] not in [m[:1] for m in notifier.sent]


def test_reloadsAreToldBetweenReadyAndStopping():
    """
    A SIGHUP's reload is RELOADING=1 (stamped with the monotonic clock,
    which systemd 253's Type=notify-reload requires) then READY=1 once
    over; not before the service is ready (READY=1 would say it is) nor
    while it stops.
    """
    clock, root, notifier = Clock(), Root(), RecordingNotifier()
    service = systemd.SystemdService(root, notifier, clock)
    service.startService()
    begins, ends = root.reloads
    begins()
    ends()
    assert notifier.sent == [["STATUS=starting"]]
    root.listening.callback(None)
    root.answers[0].callback(None)
    sent = len(notifier.sent)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    begins()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, stamp, status = notifier.sent[sent]
    assert (reloading, status) == ("RELOADING=1", "STATUS=reloading")
    assert stamp.startswith("MONOTONIC_USEC=") and before <= int(stamp.split("=")[1]) <= after
    ends()
    assert notifier.sent[sent + 1:] == [["READY=1", "STATUS=serving: 0 sessions (lmtp 0, pop3 0, smtp 0)"]]
    for callback in root.stopping:
        callback()
    sent = len(notifier.sent)
    begins()
    ends()
    assert len(notifier.sent) == sent
    service.stopService()


def test_theStatusSaysALastReloadFailedAndWhatWaitsForARestart():
    """
    After a reload, STATUS= (systemctl status) says whether it failed and
    which settings of the file wait for a restart, until a reload finds
    otherwise: a failed one said "serving" alone, and systemctl reload
    had succeeded (config --check passed, or at once under
    Type=notify-reload).  Not while stopping.
    """
    clock, root, notifier = Clock(), Root(), RecordingNotifier()
    service = systemd.SystemdService(root, notifier, clock)
    service.startService()
    root.listening.callback(None)
    root.answers[0].callback(None)
    begins, ends = root.reloads
    serving = "STATUS=serving: 0 sessions (lmtp 0, pop3 0, smtp 0)"
    failed = "; the last reload failed, what was in service before it still is (the log says why)"
    begins()
    root.lastReloadFailed, root.restartNeeded = True, ("max-recipients", "lmtp")
    ends()
    assert notifier.sent[-1] == ["READY=1", serving + failed + "; waiting for a restart: max-recipients, lmtp"]
    # Kept by the status sent as the sessions change.
    root.metrics.connectionOpened("pop3")
    clock.advance(systemd.STATUS_INTERVAL)
    assert notifier.sent[-1] == [
        "STATUS=serving: 1 session (lmtp 0, pop3 1, smtp 0)" + failed + "; waiting for a restart: max-recipients, lmtp"
    ]
    root.metrics.connectionClosed("pop3")
    begins()
    root.lastReloadFailed, root.restartNeeded = False, ()
    ends()
    assert notifier.sent[-1] == ["READY=1", serving]
    root.lastReloadFailed = True
    for callback in root.stopping:
        callback()
    assert notifier.sent[-1][:2] == ["STOPPING=1", "STATUS=stopping: 0 sessions (lmtp 0, pop3 0, smtp 0)"]
    service.stopService()


# -- a real twistd -----------------------------------------------------------------------


def greeting(port):
    pop = poplib.POP3("127.0.0.1", port, timeout=DEADLINE)
    try:
        return pop.getwelcome()
    finally:
        pop.quit()


def test_twistdTellsSystemd(tmp_path, notifySocket):
    server = ServerProcess(
        databaseURL(tmp_path / "mail.sqlite3"),
        ["--smtp", "tcp:0:interface=127.0.0.1", "--no-apop"],
        cwd=tmp_path,
        env={"NOTIFY_SOCKET": notifySocket.sock.getsockname(), "WATCHDOG_USEC": "400000"},
    )
    server.spawn()
    try:
        ready = notifySocket.waitFor("READY=1", server=server)
        # By READY=1 every port answers.
        server.waitUntilListening()
        assert greeting(server.port).startswith(b"+OK")
        with socket.create_connection(("127.0.0.1", server.portOf("SMTP")), timeout=DEADLINE) as smtp:
            assert smtp.recv(512).startswith(b"220 ")
        assert any(line.startswith("STATUS=serving: ") for line in ready)
        assert ["STATUS=starting"] in notifySocket.messages
        # The watchdog is fed every 0.2 s while the reactor runs.
        for _ in range(3):
            notifySocket.waitFor("WATCHDOG=1", server=server)
        server.process.send_signal(signal.SIGTERM)
        stopping = notifySocket.waitFor("STOPPING=1")
        assert any(line.startswith("STATUS=stopping: ") for line in stopping)
        assert server.process.wait(DEADLINE) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    assert "Traceback" not in server.stdout + server.stderr, server.log()


def test_aReadyThatFoundSystemdsSocketFullArrivesOnceThereIsRoom(tmp_path, notifySocket):
    """
    A real twistd started while systemd's socket is full (PID 1 busy): its
    READY=1 arrives once systemd reads again.  It was lost, the unit left
    starting until TimeoutStartSec killed the server.
    """
    address = notifySocket.sock.getsockname()
    senders = fillQueue(address)
    server = ServerProcess(databaseURL(tmp_path / "mail.sqlite3"), [], cwd=tmp_path, env={"NOTIFY_SOCKET": address})
    server.spawn()
    try:
        # Kept while the socket is full ("waits for room"), or told.
        waitFor(lambda: "READY=1 waits for room" in server.stdout or "told systemd READY=1" in server.stdout, "READY=1")
        # The other services' datagrams are read until one of the server's
        # comes (its retry may slip in as soon as there is room): the
        # READY=1 itself, nothing before it having waited.
        while (first := notifySocket.receive(timeout=0.05)) == ["X_OTHER=1"]:
            pass
        if first is not None and "READY=1" in first:
            ready = first
        else:
            ready = notifySocket.waitFor("READY=1", server=server)
        assert any(line.startswith("STATUS=serving: ") for line in ready)
        # The STATUS=starting that waited with it, superseded, is not sent late.
        assert ["STATUS=starting"] not in notifySocket.messages
    finally:
        server.stop()
        for sender in senders:
            sender.close()
    assert "Traceback" not in server.stdout + server.stderr, server.log()


def test_aStartThatUpgradesTheSchemaExtendsSystemdsStartTimeout(tmp_path, notifySocket):
    """
    A start on a database an older mailgate made (the version-3 database
    of tests/fixtures, made by b473258) upgrades the schema before READY=1:
    it says so in STATUS= and extends the unit's start timeout
    (EXTEND_TIMEOUT_USEC=) while it runs, so that a migration longer than
    TimeoutStartSec is not killed and begun again at every restart (it
    sent nothing: systemd waited for READY=1 as for any start).
    """
    import gzip
    import shutil

    from mailgate.store.schema import LATEST

    path = tmp_path / "mail.sqlite3"
    with gzip.open(REPO / "tests" / "fixtures" / "schema-v3.sqlite3.gz") as source, open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    server = ServerProcess(
        databaseURL(path), ["--no-apop"], cwd=tmp_path, env={"NOTIFY_SOCKET": notifySocket.sock.getsockname()}
    )
    server.spawn()
    try:
        extended = notifySocket.waitFor(f"EXTEND_TIMEOUT_USEC={int(systemd.EXTEND_BY * 1_000_000)}", server=server)
        assert f"STATUS=upgrading the database schema from version 3 to {LATEST}" in extended
        notifySocket.waitFor("READY=1", server=server)
        server.waitUntilListening()
        assert greeting(server.port).startswith(b"+OK")
    finally:
        server.stop()
    assert "Traceback" not in server.stdout + server.stderr, server.log()


def test_aReloadSignalWhileTheSchemaIsUpgradedIsTakenOnceStarted(tmp_path, notifySocket):
    """
    SIGUSR1 (logrotate's postrotate) and SIGHUP (a script's reload) while a
    start upgrades the schema, before the server handles them: taken once
    it has started, not the end of it.  Their default action ended the
    process mid-upgrade (killed by SIGHUP, which systemd counts as a clean
    exit, the unit failed and not restarted; by SIGUSR1, restarted, to
    begin the upgrade again).  The test's transaction holds the upgrade
    until both are sent.
    """
    import gzip
    import shutil
    import sqlite3

    path = tmp_path / "mail.sqlite3"
    with gzip.open(REPO / "tests" / "fixtures" / "schema-v3.sqlite3.gz") as source, open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    server = ServerProcess(
        databaseURL(path), ["--no-apop"], cwd=tmp_path, env={"NOTIFY_SOCKET": notifySocket.sock.getsockname()}
    )
    server.spawn()
    try:
        notifySocket.waitFor(f"EXTEND_TIMEOUT_USEC={int(systemd.EXTEND_BY * 1_000_000)}", server=server)
        server.process.send_signal(signal.SIGUSR1)
        server.process.send_signal(signal.SIGHUP)
        holder.rollback()
        notifySocket.waitFor("READY=1", server=server)
        server.waitUntilListening()
        assert greeting(server.port).startswith(b"+OK")
        waitFor(lambda: "SIGHUP: nothing to reload" in server.stdout, "the SIGHUP taken")
        assert "SIGUSR1: no log file of mailgate's to reopen" in server.stdout
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(DEADLINE) == -signal.SIGTERM
    finally:
        holder.close()
        server.stop()
    assert "Traceback" not in server.stdout + server.stderr, server.log()


def test_theStartExtensionExtendsUntilTheUpgradeEnds(notifySocket, monkeypatch):
    """
    Every EXTEND_EVERY seconds for as long as the upgrade runs, each for
    EXTEND_BY, and nothing once it is over (the thread is gone).
    """
    monkeypatch.setattr(systemd, "EXTEND_EVERY", 0.01)
    notifier = systemd.Notifier(notifySocket.sock.getsockname())
    try:
        with systemd.StartExtension(notifier, 3, 12) as extension:
            for _ in range(3):
                lines = notifySocket.receive()
                assert lines == [
                    f"EXTEND_TIMEOUT_USEC={int(systemd.EXTEND_BY * 1_000_000)}",
                    "STATUS=upgrading the database schema from version 3 to 12",
                ]
        assert not extension._thread.is_alive()
    finally:
        notifier.close()


def execReload(config, pid):
    """
    Run the shipped unit's ExecReload= commands as systemd runs them for
    C{systemctl reload}: in order, stopping at the first that fails, with
    the unit's paths pointing at this test's configuration file and
    installed mailgate.

    @return: C{(status, output)}: the last command's exit status, what
        the commands run wrote.
    """
    import shlex
    import subprocess

    from e2e import MAILGATE

    commands = [
        line.split("=", 1)[1]
        for line in (UNITS / "mailgate.service").read_text().splitlines()
        if line.startswith("ExecReload=")
    ]
    assert commands
    output = ""
    for command in commands:
        command = command.replace("/opt/mailgate/bin/mailgate", MAILGATE)
        command = command.replace("/etc/mailgate/mailgate.toml", str(config)).replace("$MAINPID", str(pid))
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=DEADLINE)
        output += done.stdout + done.stderr
        if done.returncode != 0:
            break
    return done.returncode, output


def test_systemctlReloadRefusesWhatTheServerWouldRefuse(tmp_path, notifySocket, pair):
    """
    C{systemctl reload} runs the unit's ExecReload=: the configuration and
    its certificates are checked as the server loads them (mailgate
    config --check); a broken key fails the reload with its reason and
    the server, not signalled, serves on with what it has.  A good one is
    a SIGHUP, which the server tells systemd: RELOADING=1, then READY=1
    once reloaded.
    """
    import ssl

    from e2e import waitFor

    certificate, key = pair
    config = tmp_path / "mailgate.toml"
    config.write_text(
        f'pop3s = ["tcp:0:interface=127.0.0.1"]\ntls-cert = "{certificate}"\ntls-key = "{key}"\n'
    )
    server = ServerProcess(
        databaseURL(tmp_path / "mail.sqlite3"),
        ["--config", str(config), "--no-apop"],
        cwd=tmp_path,
        expect={"POP3S": 1},
        env={"NOTIFY_SOCKET": notifySocket.sock.getsockname()},
    )
    server.spawn()
    try:
        notifySocket.waitFor("READY=1", server=server)
        server.waitUntilListening()
        client = ssl.create_default_context(cafile=str(certificate))

        def greets():
            with socket.create_connection(("127.0.0.1", server.portOf("POP3S")), timeout=DEADLINE) as raw:
                with client.wrap_socket(raw, server_hostname="mail.example.test") as pop:
                    return pop.recv(512).startswith(b"+OK")

        good = key.read_bytes()
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        status, output = execReload(config, server.process.pid)
        assert status == 78, output
        assert f"{key}: invalid private key" in output and "configuration OK" not in output
        key.write_bytes(good)
        assert greets()

        status, output = execReload(config, server.process.pid)
        assert (status, output.strip()) == (0, f"mailgate: {config}: configuration OK")
        reloading = notifySocket.waitFor("RELOADING=1", server=server)
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        notifySocket.waitFor("READY=1", server=server)
        waitFor(lambda: "TLS certificate reloaded" in server.stdout, "the reload's log line")
        # One reload: the refused one never reached the server.
        assert server.stdout.count("configuration reloaded") == 1
        assert [m for m in notifySocket.messages if "RELOADING=1" in m] == [reloading]
        assert greets()
    finally:
        server.stop()
    assert "Traceback" not in server.stdout + server.stderr, server.log()


# Put the socket at descriptor 3, say so in the environment for this very
# process, and become twistd (exec keeps the pid).
_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class ActivatedServer(ServerProcess):
    """
    twistd started the way systemd starts a socket-activated service: the
    listening socket as descriptor 3, LISTEN_FDS=1, LISTEN_PID its pid.
    """

    def __init__(self, database, listening, options=(), **kw):
        super().__init__(database, options, listen=False, **kw)
        self.fd = listening.fileno()
        self.passFds = (self.fd,)
        self.env.update({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "pop3"})

    @property
    def argv(self):
        return [sys.executable, "-c", _ACTIVATE, str(self.fd)] + super().argv


def test_socketActivation(tmp_path, notifySocket):
    """
    The socket systemd passes is served; a reload changing the listeners
    looks their sockets up among those this process was given, as the
    next start from the same socket unit will: one it was not given was
    taken "for the next restart", which then exited 78 (Twisted reads the
    sockets as it is imported and takes LISTEN_PID out of the
    environment, so reading the file checked the syntax alone).
    """
    from e2e import waitFor

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    port = listening.getsockname()[1]
    config = tmp_path / "mailgate.toml"
    config.write_text('pop3 = ["systemd:domain=INET:name=pop3"]\n')
    server = ActivatedServer(
        databaseURL(tmp_path / "mail.sqlite3"),
        listening,
        ["--config", str(config), "--no-apop"],
        cwd=tmp_path,
        env={"NOTIFY_SOCKET": notifySocket.sock.getsockname()},
    )
    server.spawn()
    listening.close()
    try:
        notifySocket.waitFor("READY=1", server=server)
        server.waitUntilListening()
        assert server.port == port
        assert f"POP3 listening on 127.0.0.1:{port} (systemd:domain=INET:name=pop3)" in server.stdout
        assert greeting(port).startswith(b"+OK")
        config.write_text('pop3 = ["systemd:domain=INET:name=pop3", "systemd:domain=INET:name=pop3s"]\n')
        server.process.send_signal(signal.SIGHUP)
        waitFor(lambda: "configuration reload failed" in server.stdout, "the refused reload")
        assert (
            "configuration reload failed, keeping the configuration in service: pop3: "
            "'systemd:domain=INET:name=pop3s': systemd passed no socket with that index or name"
        ) in server.stdout
        # The socket it was given, by its index: taken for the restart.
        config.write_text('pop3 = ["systemd:domain=INET:index=0"]\n')
        server.process.send_signal(signal.SIGHUP)
        waitFor(lambda: "configuration changed: pop3 takes effect" in server.stdout, "the reload")
        assert greeting(port).startswith(b"+OK")
    finally:
        server.stop()
    assert "Traceback" not in server.stdout + server.stderr, server.log()


# -- the shipped units ---------------------------------------------------------------------


def unit(name):
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read_string((UNITS / name).read_text())
    return parser


def test_serviceUnit():
    service = unit("mailgate.service")["Service"]
    assert service["Type"] == "notify"
    assert service["User"] == "mailgate"
    command = service["ExecStart"]
    assert " -n " in command and "--pidfile=" in command and "mailgate --config /etc/mailgate/mailgate.toml" in command
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert "/var/lib/mailgate" in service["ReadWritePaths"]
    assert service["WatchdogSec"]
    assert service["Restart"] == "on-failure"


def test_socketUnit():
    parsed = unit("mailgate.socket")
    sockets = parsed["Socket"]
    assert sockets["FileDescriptorName"] == "pop3"
    assert parsed["Install"]["WantedBy"] == "sockets.target"
    # The service's systemd: endpoint names the socket the unit passes.
    example = (UNITS / "mailgate.socket").read_text()
    assert "systemd:domain=INET6:name=pop3" in example or "systemd:domain=INET:name=pop3" in example


def test_theSocketIsEnabledBesideTheService():
    """
    The units' installation steps enable mailgate.socket together with
    mailgate.service, never instead of it: a socket unit enabled alone
    starts its service only at the first connection to it, so mailgate's
    other listeners (LMTP for Postfix, SMTP, the metrics) were not there
    after a boot until a POP3 client came (the service unit's comment
    said "or mailgate.socket").
    """
    enables = [
        line
        for name in ("mailgate.service", "mailgate.socket")
        for line in (UNITS / name).read_text().splitlines()
        if "systemctl enable" in line
    ]
    withSocket = [line for line in enables if "mailgate.socket" in line]
    assert withSocket
    assert all("mailgate.service" in line for line in withSocket), withSocket
    assert not any("or mailgate.socket" in line for line in enables), enables


@pytest.mark.skipif(not pathlib.Path("/usr/bin/systemd-analyze").exists(), reason="systemd-analyze is not installed")
def test_unitsVerify(tmp_path):
    import subprocess

    for name in ("mailgate.service", "mailgate.socket"):
        (tmp_path / name).write_text((UNITS / name).read_text())
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "mailgate.socket")],
        capture_output=True, timeout=DEADLINE, text=True,
    )
    # The units name programs and users of an installed system; only
    # syntax errors and unknown settings matter here.
    problems = [
        line for line in (done.stdout + done.stderr).splitlines()
        if "Unknown" in line or "Invalid" in line or "Failed to parse" in line
    ]
    assert problems == [], done.stdout + done.stderr
