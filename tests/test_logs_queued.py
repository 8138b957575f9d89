"""
twistd's log (standard output, C{-l FILE}) written on a thread of its own
(L{logs.QueuedLogObserver}): a reader that takes nothing (journald slow or
stuck, a pipe nobody reads) costs lines, counted and told, never the
reactor.  A real C{twistd -n mailgate} whose standard output was a pipe
nobody read stopped answering after 11 POP3 sessions, SIGTERM included:
each line was written on the reactor's thread, and a write to the full
pipe blocked it.
"""

import fcntl
import io
import json
import os
import poplib
import re
import select
import signal
import subprocess
import threading
import time

import pytest
from twisted.logger import LogLevel

from e2e import DEADLINE, STOP_GRACE, AdminCommand, ServerProcess, childEnvironment, databaseURL, waitFor
from mailgate import logs

ALICE = "alice@example.org"


def event(text, level=LogLevel.info, **fields):
    return {
        "log_format": "{line}", "line": text, "log_level": level, "log_namespace": "mailgate.test",
        "log_time": 1764700000.0, **fields,
    }


class Reactor:
    """
    What the observer reads of the reactor: whether it runs.
    """

    def __init__(self, running=True):
        self.running = running


class StalledReader(io.StringIO):
    """
    A text stream whose reader takes nothing until C{release} is set: a
    write blocks, as one to a full pipe does.  A write on the thread that
    logged (the reactor's, in the server) is recorded in C{blocking} rather
    than blocked on, so that the test ends.
    """

    def __init__(self, loggingThread):
        super().__init__()
        self.loggingThread = loggingThread
        self.release = threading.Event()
        self.blocking = []
        self.writers = set()

    def write(self, text):
        self.writers.add(threading.current_thread())
        if threading.current_thread() is self.loggingThread:
            self.blocking.append(text)
        else:
            self.release.wait(DEADLINE)
        return super().write(text)


def queued(stream, logFormat="text", running=True, maxPending=None):
    observer = logs.observerFor(logFormat, stream, reactor=Reactor(running))
    assert isinstance(observer, logs.QueuedLogObserver)
    if maxPending is not None:
        observer.maxPending = maxPending
    return observer


def releaseAndLogOneMore(reader, observer):
    """
    The stalled C{reader} takes lines again: what waited is written, then
    a line logged after ("after"), the first to find room again.
    """
    reader.release.set()
    assert observer.flush(DEADLINE)
    observer(event("after"))
    assert observer.flush(DEADLINE)


def test_aReaderThatTakesNothingBlocksNoOneAndCostsLinesNotMemory():
    """
    While the stream takes nothing, logging returns at once: the lines
    wait in a queue of at most maxPending; the rest are dropped, counted
    (what mailgate_log_lines_lost_total exports) and said in a warning
    once there is room again, after what was written and before what
    follows.
    """
    reader = StalledReader(threading.current_thread())
    stream = logs.LogStream(stream=reader)
    observer = queued(stream, maxPending=5)
    try:
        for n in range(20):
            observer(event(f"line {n}"))
        assert reader.blocking == []
        # The first line was taken by the writing thread before the queue
        # filled, or was still in it.
        assert stream.linesDropped in (14, 15)
        assert stream.linesLost == stream.linesDropped
        dropped = stream.linesDropped
        releaseAndLogOneMore(reader, observer)
    finally:
        reader.release.set()
        observer.stop(DEADLINE)
    lines = [line.split("] ", 1)[1] for line in reader.getvalue().splitlines()]
    assert lines == [f"line {n}" for n in range(20 - dropped)] + [
        f"{dropped} log lines lost, not written to standard output: its reader took no lines while 5 waited",
        "after",
    ]
    assert "[mailgate.logs#warn]" in reader.getvalue().splitlines()[-2]
    assert reader.blocking == [] and threading.current_thread() not in reader.writers
    # Said once: the count starts again.
    assert stream.linesLost == dropped


def test_theLostLineKeepsTheLogsFormatAndPriority():
    """
    The warning saying lines were dropped is a JSON record in a JSON log
    (C{log.lines_lost}, with the count), and on the journal's stream it
    carries a warning's priority, as every line there does its own.
    """
    reader = StalledReader(threading.current_thread())
    stream = logs.LogStream(stream=reader, journal=True)
    observer = queued(stream, "json", maxPending=2)
    try:
        for n in range(6):
            observer(event(f"line {n}", session="0eba49f33955.2"))
        releaseAndLogOneMore(reader, observer)
    finally:
        reader.release.set()
        observer.stop(DEADLINE)
    lines = reader.getvalue().splitlines()
    assert all(re.match(r"<\d>\{", line) for line in lines), lines
    assert [line[:3] for line in lines[-2:]] == ["<4>", "<6>"]
    told = json.loads(lines[-2][3:])
    assert told["event"] == "log.lines_lost" and told["level"] == "warn"
    assert told["lost"] == stream.linesDropped in (3, 4)
    assert json.loads(lines[0][3:])["session"] == "0eba49f33955.2"


class RecordingFile:
    """
    A file's C{write} (an unbuffered binary file's: what it took), recorded
    call by call; the first call waits for C{release}.
    """

    def __init__(self):
        self.writes = []
        self.release = threading.Event()

    def write(self, data):
        if not self.writes:
            self.release.wait(DEADLINE)
        self.writes.append(bytes(data))
        return len(data)

    def close(self):
        pass


def test_linesQueuedTogetherAreWrittenInOneSystemCall(tmp_path):
    """
    The lines that waited while a write was under way are written
    together, in one write(2): each line a system call of its own (and a
    handover of the GIL between the two threads) cost the reactor's thread
    more than writing where it logged had.
    """
    stream = logs.LogStream(path=str(tmp_path / "mailgate.log"))
    stream._stream.close()
    stream._stream = recording = RecordingFile()
    observer = queued(stream)
    try:
        for n in range(6):
            observer(event(f"line {n}"))
        recording.release.set()
        assert observer.flush(DEADLINE)
    finally:
        recording.release.set()
        observer.stop(DEADLINE)
    written = [[line.split(b"] ", 1)[1] for line in data.splitlines()] for data in recording.writes]
    assert sum(written, []) == [b"line %d" % n for n in range(6)]
    # The first line alone (or with others that came before the thread
    # woke), the rest in one.
    assert len(written) <= 2, written


def test_linesAFileDidNotTakeAreCountedOneByOne():
    """
    A batch of lines the file did not take (/dev/full) counts as many lost
    lines, not one.
    """
    stream = logs.LogStream("/dev/full")
    try:
        stream.writeLines(["one\n", "two\n", "three\n"])
        assert stream.linesLost == stream.linesNotWritten == 3
    finally:
        stream.close()


def test_eventsAreFormattedOnTheWritingThread():
    """
    The thread that logged (the reactor's) puts the event in the queue and
    no more: formatting, JSON's included, is the writing thread's.
    """
    formatted = []

    def formatter(event):
        formatted.append(threading.current_thread())
        return logs.eventAsJSONLine(event)

    stream = logs.LogStream(stream=io.StringIO())
    observer = logs.QueuedLogObserver(stream, formatter, Reactor())
    try:
        observer(event("one"))
        observer(event("two"))
        assert observer.flush(DEADLINE)
    finally:
        observer.stop(DEADLINE)
    assert len(formatted) == 2 and threading.current_thread() not in formatted
    assert [json.loads(line)["text"] for line in stream._stream.getvalue().splitlines()] == ["one", "two"]


class SlowReader(io.StringIO):
    def write(self, text):
        time.sleep(0.02)
        return super().write(text)


def test_linesLoggedOutsideTheReactorsRunAreWrittenBeforeTheCallReturns():
    """
    Before the reactor runs and once it has stopped, a line is written
    before the observer returns, after every line queued before it: twistd
    ends a process stopped by a signal with the signal again (atexit does
    not run) right after "Server Shut Down.", which must not be lost with
    the writing thread.
    """
    reader = SlowReader()
    reactor = Reactor(running=True)
    observer = logs.observerFor("text", logs.LogStream(stream=reader), reactor=reactor)
    try:
        observer(event("serving"))
        reactor.running = False
        for text in ("Main loop terminated.", "Server Shut Down."):
            observer(event(text))
        assert [line.split("] ", 1)[1] for line in reader.getvalue().splitlines()] == [
            "serving", "Main loop terminated.", "Server Shut Down.",
        ]
    finally:
        observer.stop(DEADLINE)


def test_aStopWithAReaderThatTakesNothingWaitsABoundedTime():
    """
    Once the reactor has stopped, a reader that takes nothing is waited for
    exitWait seconds, once: the lines after it are queued without waiting
    again (the process ends), and written if the reader takes lines again.
    """
    reader = StalledReader(threading.current_thread())
    observer = queued(logs.LogStream(stream=reader))
    observer.exitWait = 0.2
    try:
        observer(event("serving"))
        observer._reactor.running = False
        observer(event("Main loop terminated."))
        assert observer._stuck
        observer(event("Server Shut Down."))
        assert not observer.flush(0.1)
        reader.release.set()
        assert observer.flush(DEADLINE)
        assert not observer._stuck
    finally:
        reader.release.set()
        observer.stop(DEADLINE)
    assert [line.split("] ", 1)[1] for line in reader.getvalue().splitlines()] == [
        "serving", "Main loop terminated.", "Server Shut Down.",
    ]


def test_linesGoToTheReopenedFileInTheOrderTheyWereLogged(tmp_path):
    """
    logrotate's SIGHUP or SIGUSR1: the lines logged before the reopening
    are in the old file, those after it in the new one.
    """
    path = tmp_path / "mailgate.log"
    stream = logs.LogStream(path=str(path))
    observer = queued(stream)
    try:
        observer(event("before"))
        assert observer.flush(DEADLINE)
        os.rename(path, tmp_path / "mailgate.log.1")
        observer(event("rotated, not yet reopened"))
        assert observer.flush(DEADLINE)
        assert stream.reopen()
        observer(event("after"))
        assert observer.flush(DEADLINE)
    finally:
        observer.stop(DEADLINE)
        stream.close()
    assert [line.split("] ", 1)[1] for line in (tmp_path / "mailgate.log.1").read_text().splitlines()] == [
        "before", "rotated, not yet reopened",
    ]
    assert [line.split("] ", 1)[1] for line in path.read_text().splitlines()] == ["after"]


def _fullPipe():
    """
    A pipe of one page whose reader took nothing: full.
    """
    reader, writer = os.pipe()
    fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(writer, False)
    try:
        while True:
            os.write(writer, b"x" * 512)
    except BlockingIOError:
        pass
    os.set_blocking(writer, True)
    return reader, writer


def test_aReopenNeverWaitsForALineBeingWritten():
    """
    C{-l /dev/stdout} (a container's pipe) whose reader takes nothing: the
    writing thread is blocked in a write, and a reopen (SIGUSR1, on the
    reactor's thread) does not wait for it, as it did for the lock the
    write held; the line after it goes to the file opened anew.
    """
    reader, writer = _fullPipe()
    stream = logs.LogStream(path=f"/dev/fd/{writer}")
    observer = queued(stream)
    try:
        observer(event("blocked"))
        waitFor(lambda: stream._lock.locked(), "the writing thread to block in its write")
        reopening = threading.Thread(target=stream.reopen, daemon=True)
        reopening.start()
        reopening.join(DEADLINE)
        assert not reopening.is_alive(), "the reopen waited for the blocked write"
        observer(event("after the reopen"))
        drained = b""
        os.set_blocking(reader, False)
        deadline = time.monotonic() + DEADLINE
        while b"after the reopen" not in drained and time.monotonic() < deadline:
            select.select([reader], [], [], 0.5)
            try:
                drained += os.read(reader, 65536)
            except BlockingIOError:
                pass
        assert observer.flush(DEADLINE)
        assert stream._replacement is None
    finally:
        # A write still blocked fails once the reader is gone.
        os.close(reader)
        observer.stop(1.0)
        stream.close()
        os.close(writer)
    lines = [line for line in drained.split(b"\n") if b"] " in line]
    assert [line.split(b"] ", 1)[1] for line in lines] == [b"blocked", b"after the reopen"]


def test_withoutAReactorEachLineIsWrittenWhereItWasLogged():
    """
    An observer without a reactor (a test's, a tool's) writes each line
    before it returns, on the thread that logged it, as Twisted's does.
    """
    reader = io.StringIO()
    observer = logs.observerFor("text", logs.LogStream(stream=reader))
    assert not isinstance(observer, logs.QueuedLogObserver)
    observer(event("at once"))
    assert reader.getvalue().endswith("] at once\n")


# -- the real twistd ------------------------------------------------------------------------------


class UnreadServer(ServerProcess):
    """
    A C{twistd -n mailgate} whose standard output is a pipe of one page
    that the test reads up to the listening line, and then not until it
    says so (journald slow or stuck); standard error goes to a file.
    """

    def __init__(self, database, cwd):
        super().__init__(database, cwd=cwd)
        self.read = b""
        self._reader = None
        self._errors = cwd / "stderr.txt"

    def spawn(self):
        reader, writer = os.pipe()
        fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 4096)
        with open(self._errors, "wb") as errors:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=writer, stderr=errors, cwd=self.cwd,
                env=childEnvironment(), start_new_session=True,
            )
        os.close(writer)
        os.set_blocking(reader, False)
        self._reader = reader

    def readAvailable(self, wait=0.5):
        select.select([self._reader], [], [], wait)
        try:
            chunk = os.read(self._reader, 65536)
        except BlockingIOError:
            return False
        self.read += chunk
        return chunk == b""

    def readUntil(self, predicate, what):
        deadline = time.monotonic() + DEADLINE
        while not predicate(self.read.decode("utf-8", "replace")):
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {DEADLINE} s\n{self.log()}")
            if self.readAvailable():
                pytest.fail(f"standard output ended before {what}\n{self.log()}")

    def writeBlocked(self):
        """
        Whether a thread of the server waits in a write to the pipe (the
        pipe's one page holds what it could take: a batch of lines larger
        than the room left waits whole, however few octets the page holds).
        """
        tasks = f"/proc/{self.process.pid}/task"
        for task in os.listdir(tasks):
            try:
                with open(f"{tasks}/{task}/wchan") as wchan:
                    if wchan.read().endswith("pipe_write"):  # (anon_pipe_write since Linux 6.x)
                        return True
            except OSError:
                pass
        return False

    def log(self):
        status = self.process.poll() if self.process is not None else None
        return (
            f"argv: {self.argv}\nexit status: {status}\n--- stdout read ---\n"
            f"{self.read.decode('utf-8', 'replace')}--- stderr ---\n{self._errors.read_text()}"
        )

    def stop(self):
        if self.process is None:
            return None
        self.terminate()
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None
        return self.process.returncode


@pytest.fixture
def unreadServer(tmp_path):
    database = databaseURL(tmp_path / "mail.sqlite3")
    AdminCommand(database).addUser(ALICE, "secret")
    server = UnreadServer(database, tmp_path)
    server.spawn()
    try:
        server.readUntil(lambda out: re.search(r"POP3 listening on 127\.0\.0\.1:\d+", out), "listening line")
        server.port = int(re.search(r"POP3 listening on 127\.0\.0\.1:(\d+)", server.read.decode()).group(1))
        yield server
    finally:
        server.stop()


def serveSessions(server, count):
    for n in range(count):
        try:
            client = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
            client.user(ALICE)
            client.pass_("secret")
            client.stat()
            client.quit()
        except (OSError, poplib.error_proto) as e:
            pytest.fail(f"session {n + 1} of {count} not served with standard output unread: {e!r}")


SESSIONS = 40


def test_aStandardOutputNobodyReadsStopsNoSession(unreadServer):
    """
    A real C{twistd -n mailgate}, its standard output a pipe nobody reads
    once it listens: every session is served, its lines waiting; once
    the reader takes lines again, every session's login line is there, in
    order, and a stop loses nothing ("Server Shut Down." last).
    """
    server = unreadServer
    serveSessions(server, SESSIONS)
    # The server had lines it could not write, and served every session.
    waitFor(server.writeBlocked, "a write to the pipe to block")
    server.readUntil(lambda out: out.count(f"pop3 login user={ALICE}") == SESSIONS, "login line of every session")
    server.process.send_signal(signal.SIGTERM)
    server.readUntil(lambda out: "Server Shut Down." in out, "last line")
    assert server.process.wait(STOP_GRACE) in (0, -signal.SIGTERM)
    lines = server.read.decode().splitlines()
    assert lines[-1].endswith("Server Shut Down."), lines[-3:]
    assert "log lines lost" not in server.read.decode()


def test_aStopWithStandardOutputUnreadEndsTheProcess(unreadServer):
    """
    SIGTERM while the pipe is still unread: the server stops, the lines
    that could not be written waited for a bounded time (a reactor
    blocked in a write never handled the signal).
    """
    server = unreadServer
    serveSessions(server, SESSIONS)
    waitFor(server.writeBlocked, "a write to the pipe to block")
    server.process.send_signal(signal.SIGTERM)
    try:
        status = server.process.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"twistd did not stop within {STOP_GRACE} s of SIGTERM with standard output unread")
    assert status in (0, -signal.SIGTERM)


def test_syslogsDroppedLinesAreCountedInTheMetricsToo(tmp_path, monkeypatch):
    """
    Under twistd's C{--syslog}, events dropped while the syslog daemon took
    nothing are counted in mailgate_log_lines_lost_total as standard
    output's are: the warning saying so comes only once the daemon takes
    lines again, too late for an alert.
    """
    import syslog

    from mailgate import tap

    release = threading.Event()
    sent = []

    def stuck(priority, message):
        release.wait(DEADLINE)
        sent.append(message)

    monkeypatch.setattr(syslog, "openlog", lambda *args: None)
    monkeypatch.setattr(syslog, "syslog", stuck)
    monkeypatch.setattr(logs.SyslogObserver, "maxPending", 2)
    monkeypatch.setattr(logs.SyslogObserver, "exitWait", 0.1)
    monkeypatch.setattr(tap.twistedcompat, "leanEventDispatch", lambda reactor: False)
    monkeypatch.setattr(tap.logs, "forwardStandardLogging", lambda: None)
    options = tap.Options()
    options.parseOptions(["--database", f"sqlite:///{tmp_path / 'mail.sqlite3'}"])
    options.parent = {"syslog": True, "nodaemon": True, "prefix": "twisted"}
    service = tap.makeService(options)
    try:
        observer = service.logObserver
        assert isinstance(observer, logs.SyslogObserver)
        for n in range(6):
            observer(event(f"line {n}"))
        lost = service.metrics.registry.get_sample_value("mailgate_log_lines_lost_total")
        assert lost == observer.linesLost in (3, 4)
        release.set()
        assert observer.flush(DEADLINE)
        observer(event("after"))
        assert observer.flush(DEADLINE)
        assert sent[-2].endswith(f"{int(lost)} log events not sent to syslog: the syslog daemon took no lines while 2 "
                                 "waited (is it stuck?)")
        # Counted since the start, not since the warning.
        assert service.metrics.registry.get_sample_value("mailgate_log_lines_lost_total") == lost
    finally:
        release.set()
        service.store.close()


def test_twistdsObserversAreTwistedLoggerObservers():
    """
    The observers mailgate gives twistd (the queued one for its log file or
    standard output, the syslog one) provide twisted.logger's
    ILogObserver, so that twistd calls them as they are: one that did not
    was wrapped in Twisted's LegacyLogObserverWrapper, which added the
    legacy keys to every event on the thread that logged (the reactor's),
    and twistd warned at each start that such an observer is deprecated.
    """
    from twisted.logger import ILogObserver
    from zope.interface.verify import verifyObject

    observer = queued(logs.LogStream(stream=io.StringIO()))
    try:
        assert verifyObject(ILogObserver, observer)
    finally:
        observer.stop(DEADLINE)
    assert ILogObserver.implementedBy(logs.SyslogObserver)
