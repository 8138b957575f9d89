"""
Steps of the wall clock: NTP stepping it by an hour, a virtual machine
resumed after a suspend.  Twisted's reactor schedules its timers on
C{time.time}, so a step forward makes every pending timer due at once; a
timer must then find, on the monotonic clock, that its time has not come.
The machine's clock is never touched: L{SteppedClock} is a reactor clock
that a test steps while the monotonic clock stands still.
"""

import time

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailgate.testing import POP3Session, SMTPSession, addUser
from mailgate.timers import elapsedClock

ALICE = "alice@example.org"
HOUR = 3600


class SteppedClock(Clock):
    """
    The reactor's clock (the wall clock) beside a monotonic one: time
    passing (L{advance}) moves both, a step (L{step}) the wall clock alone,
    running what falls due as the reactor would.
    """

    def __init__(self):
        super().__init__()
        self.ticks = 1000.0

    def monotonic(self):
        return self.ticks

    def advance(self, amount):
        self.ticks += amount
        super().advance(amount)

    def step(self, amount):
        super().advance(amount)


def test_theReactorMeasuresOnTheMonotonicClockATestClockOnItsOwn():
    from twisted.internet import reactor

    assert reactor.seconds in (time.time, time.monotonic)  # twistd mailgate: monotonic
    assert elapsedClock(reactor) is time.monotonic
    clock = Clock()
    assert elapsedClock(clock) == clock.seconds
    stepped = SteppedClock()
    assert elapsedClock(stepped) == stepped.monotonic


def test_aStepForwardClosesNoSessionAsIdle(store):
    """
    A logged-in POP3 session, an hour's step forward: every timer is due
    at once, and the idle check found an hour gone by and closed the
    session.  It now waits out the timeout as if nothing had happened.
    """
    addUser(store, ALICE, "wonderland")
    clock = SteppedClock()
    session = POP3Session(store, clock=clock)
    assert session.login(ALICE, "wonderland").startswith("+OK ")
    timeout = session.protocol.idleTimeout
    session.advance(10)
    assert session.clock.step(HOUR) is None and session.advance(0) == b""
    assert not session.disconnected
    assert session.command("STAT").startswith("+OK ")
    assert session.advance(timeout - 1) == b""
    assert session.advance(1) != b"" and session.disconnected


def test_aStepForwardEndsNoLoginAsTooSlow(store):
    """
    The login timeout counts from the greeting on the monotonic clock: an
    hour's step forward closed every connection still logging in.
    """
    clock = SteppedClock()
    session = POP3Session(store, clock=clock, loginTimeout=60)
    clock.step(HOUR)
    assert session.advance(0) == b"" and not session.disconnected
    assert session.advance(59) == b""
    assert session.advance(1) == b"-ERR no login within 60 seconds; closing the connection\r\n"


def test_aStepForwardRefusesNoMessageAsArrivingTooSlowly(store):
    """
    A message arriving: an hour's step forward made its data look an hour
    late, and it was refused with 421 "data too slow" (seconds=3600 in
    the log).  It is now taken.
    """
    addUser(store, ALICE, "wonderland")
    clock = SteppedClock()
    session = SMTPSession(store, clock=clock)
    assert session.command("EHLO client.test").startswith("250")
    assert session.command("MAIL FROM:<sender@remote.test>").startswith("250")
    assert session.command(f"RCPT TO:<{ALICE}>").startswith("250")
    assert session.command("DATA").startswith("354")
    session.send(b"Subject: over a step\r\n\r\nfirst half\r\n")
    clock.step(HOUR)
    assert session.advance(0) == b""
    assert session.send(b"second half\r\n.\r\n").startswith(b"250 2.0.0")


class _PendingPortal:
    """
    A portal whose check is still under way until the test answers it
    (the real check runs on a worker thread).
    """

    def __init__(self):
        self.checks = []

    def login(self, credentials, mind, *interfaces):
        d = defer.Deferred()
        self.checks.append(d)
        return d


def test_aStepBackDuringAFailedLoginsCheckDoesNotHoldItsAnswerForAnHour(store):
    """
    The failure delay counts from the question, on the monotonic clock: a
    step back of an hour while the password was being checked added the
    hour to the delay, and the client waited an hour for its -ERR.
    """
    clock = SteppedClock()
    session = POP3Session(store, clock=clock, authFailureDelay=1.0)
    portal = session.factory.portal = _PendingPortal()
    session.command(f"USER {ALICE}")
    assert session.command("PASS wrong") == "" and len(portal.checks) == 1
    clock.step(-HOUR)
    clock.advance(0.25)
    portal.checks[0].errback(UnauthorizedLogin())
    assert session.advance(0.74) == b""
    assert session.advance(0.01).startswith(b"-ERR ")


def test_aStepForwardGivesUpNoDatabaseConnectionMidStatement(postgresURL):
    """
    A statement under way on a reactor-driven PostgreSQL connection, an
    hour's step forward: its deadline (75 seconds) looked an hour past,
    and the connection was given up ("no answer in 75 seconds"), failing
    the statement.  The statement is now answered on its connection.
    """
    from iterated import IteratedReactor
    from mailgate.store import engineFromURL
    from mailgate.store.database import WorkerThreads
    from mailgate.store.pgreactor import ReactorConnection, Statement

    sleep = Statement("test_step_sleep", "SELECT pg_sleep($1::float8)")
    engine = engineFromURL(postgresURL)
    reactor = IteratedReactor()
    step = [0.0]
    reactor.monotonic = time.monotonic
    reactor.seconds = lambda: time.time() + step[0]
    threads = WorkerThreads(reactor, 1, "test-connect")
    threads.start()
    conn = ReactorConnection(reactor, lambda: threads.submit(engine.connectPrepared, [sleep]), "test connection")
    try:
        d = conn.execute(sleep, [b"0.3"])
        reactor.callLater(0.1, step.__setitem__, 0, HOUR)
        result = reactor.wait(d, timeout=10)
        assert not isinstance(result, Failure), result
        assert conn.connections == 1
    finally:
        reactor.wait(conn.close())
        threads.stop()
        reactor.close()


class _Durations:
    def __init__(self):
        self.seconds = []

    def databaseError(self):
        pass

    def databaseOperation(self, operation, seconds):
        self.seconds.append(seconds)


def test_aStepBackMakesNoDatabaseStatementTakeLessThanNothing():
    """
    A statement's duration (mailgate_database_seconds) is
    measured on the monotonic clock: a step back of an hour while it ran
    made it take -3600 seconds, which a histogram takes into its lowest
    bucket and subtracts from its sum.
    """
    from mailgate.store.postgres import _measure

    clock, durations = SteppedClock(), _Durations()
    d = defer.Deferred()
    _measure(d, durations, "test", clock)
    clock.step(-HOUR)
    clock.advance(0.25)
    d.callback(None)
    assert durations.seconds == [0.25]


def test_aStepBackSilencesNoRefusalLogForAnHour():
    """
    Refused connections are logged at most once a minute for a client: a
    step back of an hour made the minute last an hour and a minute, and a
    banned address hammering the server had not a line in the log.
    """
    from mailgate.session.refusals import RefusalLog

    clock = SteppedClock()
    refusals = RefusalLog(clock)
    assert refusals.note("192.0.2.7", "banned") == 0
    clock.step(-HOUR)
    assert refusals.note("192.0.2.7", "banned") is None
    clock.advance(60)
    assert refusals.note("192.0.2.7", "banned") == 1


def test_aStepBackDelaysNoWarningOfRunningOutOfDescriptors():
    """
    The accept loop's warnings (at most one a minute) are timed on the
    monotonic clock: after a step back of an hour, the next warning was
    due an hour and a minute after the last, and the EMFILE line not
    written for that long.
    """
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import Logger

    from mailgate.session.accepting import ReserveErrors

    reactor, events = MemoryReactorClock(), []
    ticks = [0.0]
    reactor.monotonic = lambda: ticks[0]
    errors = ReserveErrors(reactor, events.append)
    errors.log = Logger(observer=events.append)
    event = {"log_format": "EMFILE recovery file descriptor could not be reopened"}
    errors(event)
    reactor.advance(-HOUR)
    ticks[0] += 60
    errors(event)
    assert len([e for e in events if e.get("event") == "listener.no_spare_descriptor"]) == 2


def test_monotonicTimersOnlyOnAReactorWithNothingScheduled():
    """
    C{twistd mailgate} runs the reactor's timers on the monotonic clock:
    on the wall clock, a step of it back held every timer back as long as
    the step (idle and login timeouts, heartbeats, ban refreshes, and the
    systemd watchdog's WATCHDOG=1, whose unit restarts the server after
    60 s without one).  A reactor with calls scheduled on the wall clock
    is left as it is: they would never be due.
    """
    from iterated import IteratedReactor

    from mailgate.timers import monotonicTimers, wallClock

    reactor = IteratedReactor()
    try:
        assert monotonicTimers(reactor)
        assert reactor.seconds is time.monotonic
        assert elapsedClock(reactor) is time.monotonic and wallClock(reactor) is time.time
        ran = []
        reactor.callLater(0, ran.append, "ran")
        reactor.turnUntil(lambda: ran, timeout=5)
    finally:
        reactor.close()
    busy = IteratedReactor()
    try:
        call = busy.callLater(60, lambda: None)
        assert not monotonicTimers(busy)
        assert busy.seconds is time.time and wallClock(busy) is time.time
        call.cancel()
    finally:
        busy.close()


def test_thePolicyKeepsWallClockTimesWhereTheTimersAreMonotonic(store):
    """
    The times the connection policy writes to the database and compares
    with what is there (failed logins, bans' ends) are wall-clock times,
    which every node and the mailgate command share: on a reactor whose
    timers run on the monotonic clock, they are read from the wall clock.
    A ban that ended ten seconds ago is over; a failed login is dated now.
    """
    from twisted.internet.address import IPv4Address

    from mailgate.policy.connection import ConnectionPolicy
    from mailgate.policy.settings import PolicySettings
    from mailgate.store.policy import SQLPolicyStore
    from mailgate.testing import resultOf

    reactor = Clock()
    reactor.seconds = time.monotonic
    policies = SQLPolicyStore(store.database)
    resultOf(policies.addBan("192.0.2.44", time.time() - 3600, 3590))
    policy = ConnectionPolicy(policies, reactor, PolicySettings(exemptNetworks=["none"]))
    client = IPv4Address("TCP", "192.0.2.44", 40000)
    policy.start()
    try:
        assert policy.admit("pop3", client) is None
        policy.connectionClosed("pop3", client)
        before = time.time()
        policy.authenticationFailed(client, ALICE, "wrong")
        [failure] = resultOf(policies.changes(None, before - 5, time.time())).failures
        assert before - 1 <= failure.at <= time.time() + 1
    finally:
        policy.stop()


def test_aStepBackHidesNoFailedLoginsOfTheOtherNodes(store):
    """
    Each node reads the failed logins the others recorded since its last
    read (by its clock, less two seconds), for the penalty they share.
    The nodes' clocks stepped back an hour together (their NTP server
    corrected): the failures recorded since were an hour older than the
    last read, and none reached the other nodes for an hour.
    """
    from twisted.internet.address import IPv4Address

    from mailgate.policy.connection import ConnectionPolicy
    from mailgate.policy.settings import PolicySettings
    from mailgate.store.policy import SQLPolicyStore

    settings = PolicySettings(banAfter=5, exemptNetworks=["none"])
    clockA, clockB = Clock(), Clock()
    clockA.advance(1_700_000_000)
    clockB.advance(1_700_000_000)
    nodeA = ConnectionPolicy(SQLPolicyStore(store.database), clockA, settings)
    nodeB = ConnectionPolicy(SQLPolicyStore(store.database), clockB, settings)
    nodeA.start()
    nodeB.start()
    attacker = IPv4Address("TCP", "192.0.2.66", 50000)
    try:
        clockB.advance(1)
        clockA.advance(-HOUR)
        clockB.advance(-HOUR)
        for _ in range(3):
            nodeA.authenticationFailed(attacker, ALICE)
        nodeB.sync.refresh()
        assert nodeB.authenticationDelay(attacker, None) == nodeA.authenticationDelay(attacker, None) == 8
    finally:
        nodeA.stop()
        nodeB.stop()
