# -*- test-case-name: tests.test_memory -*-
"""
Giving memory back to the system after a burst of connections.

What a session holds beyond Python's own small objects (OpenSSL's
connection state and buffers above all, 17 KiB or so per TLS session) comes
from the C library's C{malloc}.  When the sessions end it is freed, but
glibc returns to the system only the free memory at the very top of its
heap: the rest stays mapped, free and reusable by this process only, so the
process's RSS after a burst is the burst's high-water mark, for as long as
it runs.  Measured: 5,000 TLS sessions opened and closed, RSS 62 MiB
before, 168 MiB with them open, 176 MiB after they closed, and 77 MiB once
C{malloc_trim(0)} had been called.  For an administrator reading RSS, a
container's memory limit or a systemd C{MemoryMax}, that is the difference
between a burst that passed and one that never leaves.

L{MemoryTrimmer} calls C{malloc_trim} on a timer, but only when sessions
have ended since its previous call (an idle server is left alone), and
off the reactor thread: after a burst of thousands of sessions the call
takes tens of milliseconds, otherwise a fraction of one.  Where there is
no glibc (musl, another system), there is nothing to call and nothing is
done.
"""

import ctypes
import os

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

TRIM_INTERVAL = 60
# A trim that gave back less than this is not worth a log line.
REPORT_THRESHOLD = 1 << 20


def glibcTrim(library=None):
    """
    glibc's C{malloc_trim(0)} as a function of no arguments, or C{None}
    where the C library has none.

    @param library: a shared library's name (for tests); by default the
        symbols this process already has, its C library's among them (no
        search for the library's file, which would run C{ldconfig}).
    """
    try:
        function = ctypes.CDLL(library).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: function(0)


# This process's: found once, at import.
GLIBC_TRIM = glibcTrim()


def residentBytes():
    """
    This process's resident set size in bytes, or C{None} where C{/proc}
    does not tell.
    """
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryTrimmer(TimerService):
    """
    Every C{interval} seconds, if sessions have ended since the previous
    trim, hands the C library's free memory back to the system.

    @param reactor: the reactor: the timer's clock, and the thread pool the
        trim runs in.
    @param tracker: counts the sessions that ended (its C{ended}), such as
        the server's L{mailgate.session.SessionTracker}.
    @param trim: the function that gives memory back (by default
        glibc's, L{GLIBC_TRIM}); C{None}: nothing to do on this system.
    @param inThread: runs a function off the reactor thread and returns a
        L{Deferred} of its result (by default, in C{reactor}'s thread pool).
    @param resident: reads the process's RSS in bytes (L{residentBytes}).
    @ivar trims: how many trims have run.
    """

    log = Logger(namespace="mailgate.memory")

    def __init__(
        self, reactor, tracker, interval=TRIM_INTERVAL, trim=GLIBC_TRIM, inThread=None, resident=residentBytes
    ):
        super().__init__(interval, self.check)
        self.clock = reactor
        self._tracker = tracker
        self._trim = trim
        self._inThread = inThread or (lambda f: deferToThreadPool(reactor, reactor.getThreadPool(), f))
        self._resident = resident
        self._seen = 0
        self._trimming = False
        self.trims = 0

    @property
    def interval(self):
        return self.step

    @property
    def _off(self):
        # A step of 0 would be a call at every turn of the loop.
        return self._trim is None or not self.step

    def startService(self):
        self._seen = self._tracker.ended
        if self._off:
            Service.startService(self)
        else:
            super().startService()

    def stopService(self):
        if self._off:
            return Service.stopService(self)
        return super().stopService()

    def setInterval(self, interval):
        """
        Trim every C{interval} seconds (0: never) from now on (a reload):
        the next check comes C{interval} seconds from now, not at the end
        of the period under way, which may be much longer.  The sessions
        that ended since the last trim still count towards the next.
        """
        seen = self._seen
        running = self.running
        if running:
            self.stopService()
        self.step = interval
        if running:
            # Started again: the timer's loop checks at once, then every
            # interval.
            self.startService()
            self._seen = seen

    def check(self):
        """
        Trim now if sessions have ended since the last trim and none is
        running.  Returns nothing: the timer never waits for the trim.
        """
        ended = self._tracker.ended
        if ended == self._seen or self._trimming:
            return
        self._seen = ended
        self._trimming = True
        d = self._inThread(self._trimAndMeasure)
        d.addCallbacks(self._trimmed, self._trimFailed)

    def _trimAndMeasure(self):
        before = self._resident()
        self._trim()
        return before, self._resident()

    def _trimmed(self, sizes):
        self._trimming = False
        self.trims += 1
        before, after = sizes
        if before is None or after is None or before - after < REPORT_THRESHOLD:
            return
        self.log.info(
            "gave {freedMiB} MiB of freed memory back to the system (RSS {beforeMiB} -> {afterMiB} MiB)",
            event="memory.trimmed",
            freedMiB=round((before - after) / 2**20, 1),
            beforeMiB=round(before / 2**20, 1),
            afterMiB=round(after / 2**20, 1),
        )

    def _trimFailed(self, failure):
        self._trimming = False
        self.log.failure("giving memory back to the system failed", failure, event="memory.trim_failed")
