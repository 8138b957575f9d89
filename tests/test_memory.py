"""
Freed memory goes back to the system after sessions end
(L{mailgate.memory}): glibc's C{malloc_trim} found and working in this
process, the trimmer's timing on a fake clock, its wiring from the
configuration, and a real C{twistd mailgate} whose RSS falls again after
a burst of TLS connections.
"""

import socket
import ssl

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python import usage

from mailgate.config import MailgateConfig
from mailgate.memory import REPORT_THRESHOLD, MemoryTrimmer, glibcTrim, residentBytes
from mailgate.service import makeService
from mailgate.session import SessionTracker
from mailgate.testing import memoryStore

from e2e import DEADLINE, mailgate_server, sqliteOnly, waitFor  # noqa: F401 (mailgate_server is a fixture)

MiB = 2**20


# -- the C library -------------------------------------------------------------------


def test_glibcTrimGivesFreedMemoryBack():
    """
    On this (glibc) system the trim is found, and memory freed in the
    middle of the heap, which C{free} alone keeps, is returned by it.
    """
    trim = glibcTrim()
    assert trim is not None
    # ~64 MiB in 1 KiB pieces: above pymalloc's limit, below mmap's, so
    # glibc's heap; the last piece stays, so the freed ones are not at the
    # heap's top, where free() would give them back by itself.
    pieces = [bytes(1024) for _ in range(64 * 1024)]
    keep = bytes(1024)
    held = residentBytes()
    del pieces
    freed = residentBytes()
    trim()
    trimmed = residentBytes()
    assert held - freed < 16 * MiB, "free() alone gave most of it back: nothing for the trim to show"
    assert freed - trimmed > 32 * MiB, (held, freed, trimmed)
    del keep


def test_noTrimWithoutTheLibrary():
    """
    A C library that cannot be loaded means there is nothing to call.
    """
    assert glibcTrim("libmailgate-nonexistent.so.9") is None


def test_residentBytesIsThisProcesssRSS():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert abs(residentBytes() - kib * 1024) < 8 * MiB


# -- the trimmer's timing ----------------------------------------------------------------


class _Ended:
    """
    A session tracker's count of ended sessions.
    """

    ended = 0


class _Trimmer:
    """
    A L{MemoryTrimmer} on a L{Clock} with a recording trim, its thread
    hand-off under the test's control: C{release()} finishes the oldest
    trim still running.  C{rss}: the RSS read before the first trim, then
    after it (and so on, round).
    """

    def __init__(self, interval=60, rss=(100 * MiB, 40 * MiB)):
        self.clock = Clock()
        self.tracker = _Ended()
        self.calls = 0
        self.running = []
        self._rss = list(rss)
        self.service = MemoryTrimmer(
            self.clock, self.tracker, interval=interval, trim=self._trim, inThread=self._inThread,
            resident=self._resident,
        )

    def _trim(self):
        self.calls += 1

    def _resident(self):
        return self._rss[self.calls % len(self._rss)] if self._rss else None

    def _inThread(self, function):
        d = defer.Deferred()
        self.running.append((d, function))
        return d

    def release(self):
        d, function = self.running.pop(0)
        try:
            result = function()
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def sessionsEnd(self, count=1):
        self.tracker.ended += count


def test_anIdleServerIsLeftAlone():
    t = _Trimmer()
    t.service.startService()
    t.clock.advance(600)
    assert t.running == [] and t.calls == 0


def test_aTrimFollowsEndedSessionsOncePerInterval():
    t = _Trimmer(interval=60)
    t.service.startService()
    t.sessionsEnd(5)
    t.clock.advance(59)
    assert t.running == [], "not before the interval"
    t.clock.advance(1)
    assert len(t.running) == 1
    t.release()
    assert t.calls == 1 and t.service.trims == 1
    # Nothing ended since: the next ticks do nothing.
    t.clock.advance(120)
    assert t.running == []
    t.sessionsEnd()
    t.clock.advance(60)
    t.release()
    assert t.calls == 2


def test_aTrimStillRunningMakesTheNextTickSkip():
    t = _Trimmer(interval=1)
    t.service.startService()
    t.sessionsEnd()
    t.clock.advance(1)
    t.sessionsEnd()
    t.clock.advance(1)
    t.clock.advance(1)
    assert len(t.running) == 1
    t.release()
    # The sessions that ended meanwhile are trimmed for at the next tick.
    t.clock.advance(1)
    assert len(t.running) == 1


def test_whatWasGivenBackIsLogged(logEvents):
    t = _Trimmer(interval=1, rss=(100 * MiB, 40 * MiB))
    t.service.startService()
    t.sessionsEnd()
    t.clock.advance(1)
    t.release()
    [event] = [e for e in logEvents if e.get("event") == "memory.trimmed"]
    assert (event["beforeMiB"], event["afterMiB"], event["freedMiB"]) == (100.0, 40.0, 60.0)


def test_littleGivenBackIsNotLogged(logEvents):
    t = _Trimmer(interval=1, rss=(100 * MiB, 100 * MiB - REPORT_THRESHOLD + 1))
    t.service.startService()
    t.sessionsEnd()
    t.clock.advance(1)
    t.release()
    assert t.service.trims == 1
    assert not [e for e in logEvents if e.get("event") == "memory.trimmed"]


def test_noRSSToReadStillTrims(logEvents):
    t = _Trimmer(interval=1, rss=())
    t.service.startService()
    t.sessionsEnd()
    t.clock.advance(1)
    t.release()
    assert t.calls == 1
    assert not [e for e in logEvents if e.get("event") == "memory.trimmed"]


def test_aFailedTrimIsLoggedAndTheNextStillRuns(logEvents):
    t = _Trimmer(interval=1)

    def broken():
        raise OSError("no")

    t.service._trim = broken
    t.service.startService()
    t.sessionsEnd()
    t.clock.advance(1)
    t.release()
    assert [e for e in logEvents if e.get("event") == "memory.trim_failed"]
    t.service._trim = t._trim
    t.sessionsEnd()
    t.clock.advance(1)
    t.release()
    assert t.calls == 1


@pytest.mark.parametrize("interval, trim", [(0, "recording"), (60, None)])
def test_offWhenZeroOrWhereThereIsNothingToCall(interval, trim):
    clock, tracker, calls = Clock(), _Ended(), []
    service = MemoryTrimmer(
        clock, tracker, interval=interval, trim=(lambda: calls.append(1)) if trim else None,
        inThread=defer.maybeDeferred,
    )
    service.startService()
    tracker.ended += 3
    clock.advance(3600)
    assert calls == [] and clock.getDelayedCalls() == []
    service.stopService()
    assert not service.running


def test_stoppedItTrimsNoMore():
    t = _Trimmer(interval=1)
    t.service.startService()
    t.service.stopService()
    t.sessionsEnd()
    t.clock.advance(10)
    assert t.running == [] and t.clock.getDelayedCalls() == []


def test_theTrimRunsInTheReactorsThreadPoolNotOnTheReactorThread():
    """
    By default the trim (which can take tens of milliseconds after a big
    burst) is handed to the reactor's thread pool; the timer's tick only
    queues it.
    """
    queued, calls = [], []

    class Pool:
        def callInThreadWithCallback(self, onResult, function, *args, **kwargs):
            queued.append((onResult, function))

    class Reactor(Clock):
        def getThreadPool(self):
            return Pool()

        def callFromThread(self, function, *args, **kwargs):
            function(*args, **kwargs)

    reactor, tracker = Reactor(), _Ended()
    service = MemoryTrimmer(reactor, tracker, interval=1, trim=lambda: calls.append(1), resident=lambda: None)
    service.startService()
    tracker.ended += 1
    reactor.advance(1)
    assert calls == [] and len(queued) == 1
    onResult, function = queued[0]
    # What the pool's thread does: run it, then report back.
    onResult(True, function())
    assert calls == [1] and service.trims == 1


def test_theTrackerCountsEachEndedSessionOnce():
    tracker = SessionTracker(Clock())
    a, b = object(), object()
    tracker.add(a)
    tracker.add(b)
    tracker.remove(a)
    tracker.remove(a)
    assert tracker.ended == 1
    tracker.remove(b)
    assert tracker.ended == 2 and len(tracker) == 0


# -- wiring ------------------------------------------------------------------------------------


def _trimmerOf(root):
    [trimmer] = [s for s in root if isinstance(s, MemoryTrimmer)]
    return trimmer


def test_theServiceTrimsAfterItsOwnSessionsByDefault():
    root = makeService(MailgateConfig(pop3=[]), reactor=Clock(), store=memoryStore())
    trimmer = _trimmerOf(root)
    assert trimmer.interval == 60
    assert trimmer._tracker is root.sessions


def test_theIntervalIsConfigurable():
    from mailgate.tap import Options

    options = Options()
    options.parseOptions(["--memory-trim-interval", "5"])
    root = makeService(options.toConfig(), reactor=Clock(), store=memoryStore())
    assert _trimmerOf(root).interval == 5
    for value in ("-1", "soon", "1.5"):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(["--memory-trim-interval", value])


# -- a real server ------------------------------------------------------------------------------


def _rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _openGreeted(port, context, count):
    sockets = []
    for _ in range(count):
        sock = context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=DEADLINE), server_hostname="127.0.0.1"
        )
        sockets.append(sock)
        assert sock.recv(512).startswith(b"+OK")
    return sockets


@sqliteOnly
def test_afterABurstOfTLSSessionsTheRSSFallsAgain(mailgate_server, pair):
    """
    1,000 POP3S sessions opened (each with OpenSSL's buffers) and closed:
    within a few seconds the server's RSS is back down by more than half
    of what they added, where glibc alone would keep it at its peak.
    """
    certificate, key = pair
    server = mailgate_server(
        "--tls-cert", str(certificate), "--tls-key", str(key),
        "--pop3s", "tcp:0:interface=127.0.0.1",
        "--memory-trim-interval", "1",
        "--max-connections-per-ip", "0",
    )
    pid = server.process.pid
    context = ssl.create_default_context(cafile=str(certificate))
    port = server.portOf("POP3S")
    # OpenSSL's and Python's one-time allocations, out of the figures.
    for sock in _openGreeted(port, context, 20):
        sock.close()
    baseline = _rss(pid)
    sockets = _openGreeted(port, context, 1000)
    peak = _rss(pid)
    assert peak - baseline > 10 * MiB, (baseline, peak)
    for sock in sockets:
        sock.close()
    waitFor(lambda: _rss(pid) < peak - (peak - baseline) / 2, "the RSS to fall")
    waitFor(lambda: "freed memory back to the system" in server.stdout, "the log line")
    assert server.process.poll() is None
