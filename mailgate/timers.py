# -*- test-case-name: tests.test_timers -*-
"""
Timers: stopping one that may already have run, and measuring what a
timer waits for on a clock that no step of the wall clock moves.
"""

import time


def cancelled(call):
    """
    Cancel C{call} (an L{IDelayedCall}, or C{None}) unless it has run or
    been cancelled already.

    @return: C{None}, for C{self._timer = cancelled(self._timer)}.
    """
    if call is not None and call.active():
        call.cancel()
    return None


def elapsedClock(clock):
    """
    The clock on which to measure how long something has taken, for
    timers scheduled on C{clock}.

    Twisted's reactor schedules C{callLater} on C{reactor.seconds()}, which
    is C{time.time}: the wall clock, which NTP or an administrator steps
    (and a virtual machine resumed after a suspend jumps).  A step forward
    of an hour makes every pending timer due at once; a timer that then
    measured the time gone by on the same clock saw an hour go by, and
    closed every session as idle, every login as too slow, every message
    arriving as too slow.  A timer that measures on the monotonic clock
    finds that its time has not come and waits the rest.  (A step back
    still makes timers late: the reactor's own clock is not mailgate's to
    change.)

    @param clock: the reactor, or a test's L{twisted.internet.task.Clock}.
    @return: a callable returning seconds: C{clock.monotonic} when the
        clock has one (a test's stand-in for the monotonic clock beside a
        wall clock it steps); C{time.monotonic} when C{clock} keeps the
        wall clock (the reactor) or none (a test's reactor that only runs
        calls); else C{clock.seconds} (a test's clock, on which no step
        happens).
    """
    monotonic = getattr(clock, "monotonic", None)
    if monotonic is not None:
        return monotonic
    seconds = getattr(clock, "seconds", None)
    if seconds is None or seconds is time.time:
        return time.monotonic
    return seconds


def wallClock(clock):
    """
    The clock on which to read the times that are written to the database
    or compared with what is there (failed logins, bans' ends): wall-clock
    times, which every node and the C{mailgate} command share.

    @param clock: the reactor, or a test's L{twisted.internet.task.Clock}.
    @return: C{time.time} when C{clock}'s timers run on the monotonic clock
        (the reactor of C{twistd mailgate}, L{monotonicTimers}) or it has
        none; else C{clock.seconds} (an embedder's reactor, on the wall
        clock; a test's clock).
    """
    seconds = getattr(clock, "seconds", None)
    if seconds is None or seconds is time.monotonic:
        return time.time
    return seconds


def monotonicTimers(reactor):
    """
    Have C{reactor} run its timers on the monotonic clock, if it has none
    scheduled yet (they were scheduled on its wall clock, and would not
    be due for decades).

    Twisted's reactor runs them on the wall clock: a step of it back (NTP
    correcting a clock that ran ahead, a real-time clock kept in local
    time) held back every timer of the process as long as the step: idle
    and login timeouts, heartbeats (the other nodes took this one for
    gone), ban refreshes, the retention task, and the systemd watchdog's
    C{WATCHDOG=1}, whose unit then restarted the server, ending every
    session.  mailgate reads wall-clock times from L{wallClock}.

    @return: whether it does now.
    """
    if reactor.seconds is time.monotonic:
        return True
    if reactor.getDelayedCalls():
        return False
    reactor.seconds = time.monotonic
    return True
