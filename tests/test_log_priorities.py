"""
Log priorities where administrators read logs: systemd's journal (each
line on standard output prefixed with its syslog priority, C{<3>}, where
standard output is the journal's stream) and twistd's C{--syslog} (the mail
facility, each level its priority).  An administrator's C{journalctl -u
mailgate -p err} must show mailgate's errors, as it shows Dovecot's and
Postfix's: without the prefix journald recorded every line, warnings and
errors included, as C{info}; twistd's syslog observer sent warnings as
C{user.info} and errors as C{user.alert}.
"""

import io
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import syslog
import tempfile
import threading
import time

import pytest
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from certs import makeCertificate
from e2e import DEADLINE, HOSTNAME, STOP_GRACE, ServerProcess, _Drain, childEnvironment, databaseURL, waitFor
from mailgate import logs, tap

EVENTS = [
    (LogLevel.debug, 7), (LogLevel.info, 6), (LogLevel.warn, 4), (LogLevel.error, 3), (LogLevel.critical, 2),
]


def event(level, text="something happened", **fields):
    return {
        "log_format": "{line}", "line": text, "log_level": level, "log_namespace": "mailgate.test",
        "log_time": 1764700000.0, **fields,
    }


def aFailure():
    try:
        1 / 0
    except ZeroDivisionError:
        return Failure()


# -- the journal's priority prefix -------------------------------------------------


@pytest.mark.parametrize("logFormat", ["text", "json"])
def test_journalLinesBeginWithTheirPriority(logFormat):
    """
    On the journal's stream each line begins with its level's syslog
    priority, which journald takes off and keeps as the record's PRIORITY,
    in either format; elsewhere (a file, a pipe, a terminal) nothing
    changes.
    """
    journal = logs.LogStream(stream=io.StringIO(), journal=True)
    plain = logs.LogStream(stream=io.StringIO())
    for stream in (journal, plain):
        observer = logs.observerFor(logFormat, stream)
        for level, _ in EVENTS:
            observer(event(level, f"a {level.name} line"))
    written = journal._stream.getvalue().splitlines()
    assert [line[:3] for line in written] == [f"<{priority}>" for _, priority in EVENTS]
    # The rest of each line is what any other stream gets.
    assert [line[3:] for line in written] == plain._stream.getvalue().splitlines()
    if logFormat == "json":
        assert [json.loads(line[3:])["level"] for line in written] == [level.name for level, _ in EVENTS]


def test_aTracebackKeepsItsPriorityOnEveryLine():
    """
    journald makes a record of each line of a stream: every line of a
    failure's text (its traceback, one line per frame) carries the error's
    priority, so that C{journalctl -p err} shows the traceback whole, not
    its first line alone among lines of C{info}.  A JSON record is one
    line, its traceback inside.
    """
    failure = aFailure()
    stream = logs.LogStream(stream=io.StringIO(), journal=True)
    logs.observerFor("text", stream)(
        {"log_format": "it broke", "log_level": LogLevel.error, "log_namespace": "mailgate.test",
         "log_time": 1764700000.0, "log_failure": failure}
    )
    lines = stream._stream.getvalue().split("\n")
    assert lines.pop() == ""
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines
    assert lines[0].endswith("[mailgate.test#error] it broke")
    assert any("ZeroDivisionError" in line for line in lines[1:])
    assert all(line.startswith("<3>\t") for line in lines[1:])
    stream = logs.LogStream(stream=io.StringIO(), journal=True)
    logs.observerFor("json", stream)(
        {"log_format": "it broke", "log_level": LogLevel.error, "log_namespace": "mailgate.test",
         "log_time": 1764700000.0, "log_failure": failure}
    )
    [line] = stream._stream.getvalue().splitlines()
    assert line.startswith("<3>{") and "ZeroDivisionError" in json.loads(line[3:])["traceback"]


def test_theJournalIsKnownByItsDeviceAndInode(tmp_path):
    """
    C{$JOURNAL_STREAM} names the journal's stream by device and inode: a
    descriptor is the journal only where its own match.  A process the
    service starts inherits the variable with its output sent elsewhere
    (here: the socket's other end, on the same device; a file), where a
    prefix would be written as it is.
    """
    ours, theirs = socket.socketpair()
    with ours, theirs, open(tmp_path / "file", "w") as file:
        status = os.fstat(theirs.fileno())
        environ = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        assert logs.isJournalStream(theirs.fileno(), environ)
        assert logs.isJournalStream(theirs, environ)
        assert not logs.isJournalStream(ours, environ)
        assert not logs.isJournalStream(file, environ)
        for value in ("", "garbage", f"{status.st_dev}", f"{status.st_dev}:{status.st_ino}:1"):
            assert not logs.isJournalStream(theirs, {"JOURNAL_STREAM": value}), value
        assert not logs.isJournalStream(theirs, {})
        # A stream with no descriptor (a test's capture), or a closed one.
        assert not logs.isJournalStream(io.StringIO(), environ)
        closed = os.dup(theirs.fileno())
        os.close(closed)
        assert not logs.isJournalStream(closed, environ)


def refusedOnStandardError(monkeypatch, matching, start):
    """
    The exit status of C{start()}, which must end the start, and what it
    wrote to standard error, a stream socket that C{$JOURNAL_STREAM} names
    (C{matching}) or not.
    """
    ours, theirs = socket.socketpair()
    with ours, theirs:
        status = os.fstat((theirs if matching else ours).fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        stderr = theirs.makefile("w")
        monkeypatch.setattr(sys, "stderr", stderr)
        with pytest.raises(SystemExit) as e:
            start()
        stderr.close()
        theirs.shutdown(socket.SHUT_WR)
        return e.value.code, ours.makefile("r").read()


@pytest.mark.parametrize("matching", [True, False])
def test_eachLineOfAStartFailureIsAnErrorInTheJournal(monkeypatch, matching):
    """
    A start failure whose text holds a line break (a database path given
    with one: "cannot open SQLite database /srv/a<LF>b", seen on a real
    twistd) is an error in the journal whole: journald makes a record of
    each line, and the second had no priority, so info.  Elsewhere the
    text is unchanged.
    """

    def start():
        logs.writeStartFailure(sys.stderr, "mailgate: cannot open /srv/a\nb/db: no such directory")
        raise SystemExit(78)

    _, written = refusedOnStandardError(monkeypatch, matching, start)
    prefix = "<3>" if matching else ""
    assert written == f"{prefix}mailgate: cannot open /srv/a\n{prefix}b/db: no such directory\n"


@pytest.mark.parametrize("matching", [True, False])
def test_aRefusedStartIsAnErrorInTheJournal(tmp_path, monkeypatch, matching):
    """
    A start refused in one line on standard error (exit 78: twistd's
    options, or a configuration file, that cannot be served), where
    standard error is the journal's stream, as under the shipped unit: the
    line is an error there, so C{journalctl -u mailgate -p err} says why
    the service did not start.  Elsewhere the line is unchanged.
    """
    prefix = "<3>" if matching else ""

    def chroot():
        options = tap.Options()
        options.parseOptions(["--database", f"sqlite:///{tmp_path / 'mail.sqlite3'}"])
        options.parent = {"chroot": "/srv/mailgate", "nodaemon": True}
        tap.makeService(options)

    code, written = refusedOnStandardError(monkeypatch, matching, chroot)
    assert code == 78 and written.count("\n") == 1, written
    assert written.startswith(prefix + "mailgate: twistd --chroot is not supported: "), written
    config = tmp_path / "mailgate.toml"
    config.write_text("no-such-key = 1\n")
    code, written = refusedOnStandardError(
        monkeypatch, matching, lambda: tap.Options().parseOptions(["--config", str(config)])
    )
    assert code == 78 and written.count("\n") == 1, written
    assert written.startswith(f"{prefix}mailgate: {config}"), written


# -- --syslog ---------------------------------------------------------------------------------


class FakeSyslog:
    """
    The C{openlog} and C{syslog} of Python's syslog module, recorded: a test
    never writes to the host's /dev/log.
    """

    LOG_PID = syslog.LOG_PID
    LOG_MAIL = syslog.LOG_MAIL

    def __init__(self):
        self.opened = []
        self.sent = []

    def openlog(self, ident, logoption, facility):
        self.opened.append((ident, logoption, facility))

    def syslog(self, priority, message):
        self.sent.append((priority, message))


def test_syslogLinesGoToTheMailFacilityWithTheirPriority():
    """
    Under C{--syslog}, mailgate's lines go to the mail facility (where a
    syslog daemon's /var/log/mail.log has Dovecot's and Postfix's), with
    the process id, each at its level's priority: twistd's own observer
    sent warnings as info and errors as alert, to the user facility.
    """
    fake = FakeSyslog()
    observer = logs.SyslogObserver("twisted", syslog=fake)
    # twistd's default --prefix is no name for mail.log's lines.
    assert fake.opened == [("mailgate", syslog.LOG_PID, syslog.LOG_MAIL)]
    for level, _ in EVENTS:
        observer(event(level, f"a {level.name} line", session="0eba49f33955.2"))
    assert observer.flush(DEADLINE)
    assert fake.sent == [
        (syslog.LOG_MAIL | priority, f"[mailgate.test#{level.name} session=0eba49f33955.2] a {level.name} line")
        for level, priority in EVENTS
    ]
    assert [p for p, _ in fake.sent][2:] == [syslog.LOG_MAIL | syslog.LOG_WARNING,
                                             syslog.LOG_MAIL | syslog.LOG_ERR, syslog.LOG_MAIL | syslog.LOG_CRIT]
    # A prefix given is the name.
    named = FakeSyslog()
    logs.SyslogObserver("mailgate-mx2", syslog=named)
    assert named.opened == [("mailgate-mx2", syslog.LOG_PID, syslog.LOG_MAIL)]


class StuckSyslog(FakeSyslog):
    """
    A syslog daemon that takes nothing until C{release} is set: syslog(3)
    blocks, as it does on a /dev/log whose queue is full.  A call on the
    thread that logged the event (the reactor's, in the server) is
    recorded in C{blocking} rather than blocked on, so that the test ends.
    """

    def __init__(self, loggingThread):
        super().__init__()
        self.loggingThread = loggingThread
        self.release = threading.Event()
        self.blocking = []

    def syslog(self, priority, message):
        if threading.current_thread() is self.loggingThread:
            self.blocking.append(message)
            return
        self.release.wait(DEADLINE)
        super().syslog(priority, message)


def test_aStuckSyslogDaemonBlocksNoOneAndCostsLinesNotMemory():
    """
    syslog(3) blocks while the syslog daemon takes nothing (a stuck
    rsyslog): it is called on the observer's own thread, never on the one
    that logged (the reactor's: a real twistd --syslog whose /dev/log
    nobody read stopped answering after 7 POP3 sessions, new connections
    included).  At most maxPending events wait; the rest are counted, and
    said in a warning once the daemon takes lines again, after what was
    sent and before what follows.
    """
    fake = StuckSyslog(threading.current_thread())
    observer = logs.SyslogObserver(None, syslog=fake, running=lambda: True)
    observer.maxPending = 5
    for n in range(20):
        observer(event(LogLevel.info, f"line {n}"))
    assert fake.blocking == []
    assert len(observer._pending) <= 5
    fake.release.set()
    assert observer.flush(DEADLINE)
    observer(event(LogLevel.info, "after"))
    assert observer.flush(DEADLINE)
    sent = [message for _, message in fake.sent]
    # The first line was taken by the sending thread before the queue
    # filled, or was still in it: 5 or 6 sent of 20.
    assert sent[:5] == [f"[mailgate.test#info] line {n}" for n in range(5)]
    lost = 20 - (len(sent) - 2)
    assert lost in (14, 15), sent
    assert sent[-2:] == [
        f"[mailgate.logs#warn] {lost} log events not sent to syslog: the syslog daemon took no lines while 5 "
        f"waited (is it stuck?)",
        "[mailgate.test#info] after",
    ]
    assert fake.sent[-2][0] == syslog.LOG_MAIL | syslog.LOG_WARNING
    assert fake.blocking == []


class SlowSyslog(FakeSyslog):
    def syslog(self, priority, message):
        time.sleep(0.02)
        super().syslog(priority, message)


def test_linesLoggedOutsideTheReactorsRunAreSentBeforeTheCallReturns():
    """
    Before the reactor runs and once it has stopped, a line is sent before
    the observer returns: twistd ends a process stopped by a signal with
    the signal again (atexit does not run) right after its last lines,
    which the sending thread had not sent (a real twistd --syslog lost
    "Main loop terminated." and "Server Shut Down.").  While the reactor
    runs, the sending thread sends it (the stuck-daemon test above).
    """
    fake = SlowSyslog()
    running = [False]
    observer = logs.SyslogObserver(None, syslog=fake, running=lambda: running[0])
    for text in ("Main loop terminated.", "Server Shut Down."):
        observer(event(LogLevel.info, text))
    assert [message for _, message in fake.sent] == [
        "[mailgate.test#info] Main loop terminated.", "[mailgate.test#info] Server Shut Down.",
    ]
    running[0] = True
    observer(event(LogLevel.info, "serving"))
    assert observer.flush(DEADLINE)
    assert len(fake.sent) == 3


class RefusingSyslog(FakeSyslog):
    """
    A syslog(3) that raises for one message.
    """

    def syslog(self, priority, message):
        if "refuse me" in message:
            raise ValueError("refused")
        super().syslog(priority, message)


def test_aLineSyslogRefusesCostsThatLineAlone():
    """
    The sending thread is the observer's only one: a line syslog(3) raised
    for is lost, the lines after it are still sent.
    """
    fake = RefusingSyslog()
    observer = logs.SyslogObserver(None, syslog=fake)
    for text in ("first", "refuse me", "third"):
        observer(event(LogLevel.info, text))
    assert observer.flush(DEADLINE)
    assert [message for _, message in fake.sent] == ["[mailgate.test#info] first", "[mailgate.test#info] third"]


def test_aSyslogTracebackIsSentLineByLineAtTheErrorsPriority():
    """
    A syslog message is one line: a failure's traceback is sent line by
    line, each at the error's priority, its lines after the first beginning
    with a tab (as twistd's observer did, at alert); text syslog(3) cannot
    take (a NUL) is escaped rather than lost with the observer.
    """
    fake = FakeSyslog()
    observer = logs.SyslogObserver(None, syslog=fake)
    observer({"log_format": "it broke\0", "log_level": LogLevel.error, "log_namespace": "mailgate.test",
              "log_time": 1764700000.0, "log_failure": aFailure()})
    assert observer.flush(DEADLINE)
    assert len(fake.sent) > 3
    assert {priority for priority, _ in fake.sent} == {syslog.LOG_MAIL | syslog.LOG_ERR}
    assert fake.sent[0][1] == "[mailgate.test#error] it broke\\0"
    assert all(message.startswith("\t") for _, message in fake.sent[1:])
    assert any("ZeroDivisionError" in message for _, message in fake.sent)


def test_twistdsSyslogOptionGetsMailgatesObserver(tmp_path, monkeypatch):
    """
    C{twistd --syslog mailgate}: the application's log observer is
    L{logs.SyslogObserver}, which twistd takes over its own (its
    C{--logger}, given too, wins as twistd's does).
    """
    opened = FakeSyslog()
    monkeypatch.setattr(logs.SyslogObserver, "__init__", _recordingInit(opened))
    monkeypatch.setattr(tap.twistedcompat, "leanEventDispatch", lambda reactor: False)
    monkeypatch.setattr(tap.logs, "forwardStandardLogging", lambda: None)
    for parent, expected in [
        ({"syslog": True, "nodaemon": True, "prefix": "twisted"}, logs.SyslogObserver),
        ({"syslog": True, "nodaemon": True, "prefix": "twisted", "logger": "x.y"}, type(None)),
    ]:
        options = tap.Options()
        options.parseOptions(["--database", f"sqlite:///{tmp_path / 'mail.sqlite3'}"])
        options.parent = parent
        service = tap.makeService(options)
        try:
            assert type(service.logObserver) is expected
        finally:
            service.store.close()
    assert opened.opened == [("twisted",)]


def _recordingInit(fake):
    def init(self, ident=None, syslog=None, facility=None, running=None):
        # Given the reactor's state, not left to reach for the global one.
        assert running is not None and running() is False
        fake.opened.append((ident,))
    return init


# -- the real twistd ----------------------------------------------------------------------------


class JournalStreamServer(ServerProcess):
    """
    A C{twistd -n mailgate} whose standard output and error are one stream
    socket, as systemd connects a service to journald's, and read back from
    its other end.  C{$JOURNAL_STREAM} is set as systemd sets it, naming
    that socket (C{matching}) or another one on the same device: what a
    process started by a service inherits, its output sent elsewhere.
    """

    def __init__(self, database, options=(), cwd=None, matching=True, **kw):
        super().__init__(database, options, cwd=cwd, **kw)
        self.matching = matching

    def streams(self):
        """
        The end the test reads (or C{None}) and the child's standard
        output, a connected stream socket.
        """
        return socket.socketpair()

    def spawn(self):
        ours, theirs = self.streams()
        status = os.fstat((theirs if self.matching else ours).fileno())
        self.env["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
        with theirs:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=theirs.fileno(), stderr=theirs.fileno(),
                cwd=self.cwd, env={**childEnvironment(), **self.env}, start_new_session=True,
            )
        self._out = _Drain(io.FileIO(ours.detach(), "rb") if ours is not None else _nothing(), self._line)
        # Standard error is the same socket: nothing else to read.
        self._err = _Drain(_nothing(), self._line)
        self._out.start()
        self._err.start()


def _nothing():
    """
    A pipe that is at its end: a drain of it ends at once.
    """
    reader, writer = os.pipe()
    os.close(writer)
    return io.FileIO(reader, "rb")


def serveWarnAndFail(tmp_path, server):
    """
    With C{server} started (tracing a network: a warning at start), make
    its TLS certificate unreadable and send SIGHUP (an error: the reload
    failed), and stop it.
    """
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    server.process.send_signal(signal.SIGHUP)
    waitFor(lambda: "TLS reload failed" in server.stdout, "the failed reload's error")
    assert server.stop() in (0, -signal.SIGTERM)


def tlsOptions(tmp_path):
    cert, key = makeCertificate(tmp_path, HOSTNAME)
    os.replace(cert, tmp_path / "cert.pem")
    return ("--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(key), "--debug-peer", "192.0.2.0/24")


@pytest.mark.parametrize("logFormat", ["text", "json"])
def test_onTheJournalsStreamEachLineCarriesItsPriority(tmp_path, logFormat):
    """
    A real twistd whose standard output is the stream C{$JOURNAL_STREAM}
    names: its start-up line is info (C{<6>}), the tracing warning C{<4>},
    the failed TLS reload C{<3>}, and every line has a prefix, twistd's
    own included.
    """
    server = JournalStreamServer(
        databaseURL(tmp_path / "mail.sqlite3"), ("--log-format", logFormat, *tlsOptions(tmp_path)), cwd=tmp_path
    )
    server.start()
    serveWarnAndFail(tmp_path, server)
    lines = server.stdout.splitlines()
    assert lines and all(re.match(r"<[2-7]>", line) for line in lines), server.log()

    def priorityOf(needle):
        [line] = [line for line in lines if needle in line]
        return line[:3]

    assert priorityOf("POP3 listening on") == "<6>"
    assert priorityOf("tracing the sessions of clients on 192.0.2.0/24") == "<4>"
    assert priorityOf("TLS reload failed") == "<3>"
    if logFormat == "json":
        records = [json.loads(line[3:]) for line in lines]
        levels = {"<6>": "info", "<4>": "warn", "<3>": "error"}
        assert all(levels.get(line[:3], record["level"]) == record["level"] for line, record in zip(lines, records))


def test_aListenerThatCannotStartIsAnErrorInTheJournal(tmp_path):
    """
    A real twistd whose POP3 port is taken: the one line saying so, on
    standard error (the journal's stream, as standard output is under the
    unit), is an error there, with the exit status a supervisor acts on.
    """
    taken = socket.socket()
    with taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = JournalStreamServer(
            databaseURL(tmp_path / "mail.sqlite3"), ("--pop3", f"tcp:{port}:interface=127.0.0.1"),
            cwd=tmp_path, listen=False,
        )
        server.spawn()
        assert server.wait() == 1, server.log()
    [refusal] = [line for line in server.stdout.splitlines() if "mailgate: " in line and str(port) in line]
    assert refusal.startswith("<3>mailgate: "), server.log()
    assert all(re.match(r"<[2-7]>", line) for line in server.stdout.splitlines()), server.log()


def test_withAnotherStreamNamedNothingChanges(tmp_path):
    """
    C{$JOURNAL_STREAM} inherited, standard output elsewhere (the variable
    names the socket's other end: same device, another inode): no line
    has a prefix, which would be written as it is.
    """
    server = JournalStreamServer(
        databaseURL(tmp_path / "mail.sqlite3"), tlsOptions(tmp_path), cwd=tmp_path, matching=False
    )
    server.start()
    serveWarnAndFail(tmp_path, server)
    lines = server.stdout.splitlines()
    assert any("TLS reload failed" in line for line in lines)
    assert not any(line.startswith("<") for line in lines), server.log()


# -- a real systemd-journald -------------------------------------------------------------------

JOURNALD = next(
    (path for path in ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald") if os.path.exists(path)),
    None,
)


class PrivateJournald:
    """
    A real systemd-journald (a journal namespace of its own, C{mailgate}),
    run in a mount namespace of its own where /run and /var/log are
    directories of the test's: its sockets and journal files are the
    test's alone, the host's journal and /dev/log are never touched, and
    tests on parallel workers each have their own.

    It needs root (a mount namespace, bind mounts) and systemd's
    journald (Debian's C{systemd} package, in tests/sysdeps.sh); where
    either is missing, or the container forbids mount namespaces, the test
    using it is skipped saying which (test_onTheJournalsStreamEachLine...
    above checks the same prefixes on a socket of the test's own, without
    journald).
    """

    NAMESPACE = "mailgate"

    def __init__(self, directory):
        self.run = directory / "run"
        self.log = directory / "log"
        self.run.mkdir(parents=True)
        (self.log / "journal").mkdir(parents=True)
        self.process = None

    @property
    def socketPath(self):
        return self.run / "systemd" / f"journal.{self.NAMESPACE}" / "stdout"

    def start(self):
        if JOURNALD is None or shutil.which("unshare") is None or shutil.which("journalctl") is None:
            pytest.skip("systemd-journald, journalctl or unshare is not installed")
        if os.geteuid() != 0:
            pytest.skip("a private journald needs root: a mount namespace of its own")
        script = 'mount --bind "$1" /run && mount --bind "$2" /var/log && exec "$3" "$4"'
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             str(self.run), str(self.log), JOURNALD, self.NAMESPACE],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + DEADLINE
        while not self.socketPath.exists():
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode("utf-8", "replace").strip()
                pytest.skip(f"cannot run a private journald here: {output}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"journald made no stream socket within {DEADLINE} s")
            time.sleep(0.05)

    def stream(self, identifier="mailgate"):
        """
        A connection to journald's stream socket, as systemd makes one for
        a service's standard output: its header names the identifier,
        priority info for lines without a prefix, and prefixes read
        (C{SyslogLevelPrefix=yes}).
        """
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(str(self.socketPath))
        connection.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
        connection.shutdown(socket.SHUT_RD)
        return connection

    def journalctl(self, *options):
        [directory] = (self.log / "journal").glob(f"*.{self.NAMESPACE}")
        done = subprocess.run(
            ["journalctl", "--no-pager", "-D", str(directory), *options],
            capture_output=True, text=True, timeout=DEADLINE,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def records(self, identifier="mailgate"):
        records = [json.loads(line) for line in self.journalctl("-o", "json").splitlines() if line.strip()]
        return [r for r in records if r.get("SYSLOG_IDENTIFIER") == identifier]

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_GRACE)


def _message(record):
    message = record.get("MESSAGE")
    # journalctl's JSON gives a message that is not text as its octets.
    return bytes(message).decode("utf-8", "replace") if isinstance(message, list) else message


class JournaldServer(JournalStreamServer):
    """
    A C{twistd -n mailgate} whose standard output and error are a stream of
    a real journald, as systemd connects them (L{PrivateJournald}); what it
    wrote is read back from the journal.
    """

    def __init__(self, journald, database, options=(), cwd=None):
        super().__init__(database, options, cwd=cwd)
        self.journald = journald

    def streams(self):
        return None, self.journald.stream()

    @property
    def stdout(self):
        return "".join(_message(r) + "\n" for r in self.journald.records())


@pytest.fixture
def journald():
    # Not in tmp_path: the stream socket's path in it, under pytest-xdist's
    # directories, was longer than a Unix socket's address may be.
    directory = pathlib.Path(tempfile.mkdtemp(prefix="mgjd-"))
    journald = PrivateJournald(directory)
    try:
        journald.start()
        yield journald
    finally:
        journald.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_journalctlShowsErrorsAsErrors(tmp_path, journald):
    """
    The administrator's view, on a real journald: the shipped unit's JSON
    lines on standard output are recorded at their level's priority (the
    start-up info, the tracing warning, the failed TLS reload's error),
    their messages without the prefix (JSON as it was written), and
    C{journalctl -p err} shows the error alone, C{-p warning} the warning
    with it.  Before, journald recorded all three as info, and C{-p err}
    showed nothing.
    """
    server = JournaldServer(
        journald, databaseURL(tmp_path / "mail.sqlite3"), ("--log-format", "json", *tlsOptions(tmp_path)), cwd=tmp_path,
    )
    server.start()
    serveWarnAndFail(tmp_path, server)
    waitFor(lambda: any(_message(r).endswith('"text":"Server Shut Down."}') for r in journald.records()), "the last line")
    records = journald.records()
    messages = [json.loads(_message(r)) for r in records]
    priorities = {"debug": "7", "info": "6", "warn": "4", "error": "3", "critical": "2"}
    assert [r["PRIORITY"] for r in records] == [priorities[m["level"]] for m in messages]

    def priorityOf(name):
        [record] = [r for r, m in zip(records, messages) if m["event"] == name]
        return record["PRIORITY"]

    assert priorityOf("listener.started") == "6"
    assert priorityOf("trace.enabled") == "4"
    assert priorityOf("tls.reload_failed") == "3"
    errors = [json.loads(line) for line in journald.journalctl("-p", "err", "-o", "cat").splitlines()]
    assert [e["event"] for e in errors] == ["tls.reload_failed"]
    warnings = [json.loads(line)["event"] for line in journald.journalctl("-p", "warning", "-o", "cat").splitlines()]
    assert warnings == ["trace.enabled", "tls.reload_failed"]


# -- a real twistd --syslog ---------------------------------------------------------------------------


class SyslogServer(ServerProcess):
    """
    A C{twistd -n --syslog mailgate} whose /dev/log is a datagram socket of
    the test's: the process runs in a mount namespace of its own whose /dev
    is a directory of the test's (the host's null, zero and random devices
    bound into it, and C{log} a link to the socket), so that syslog(3)'s
    datagrams, with the priority and facility it put in them, come to the
    test and never to the host's syslog.  Needs root (a mount namespace);
    skipped where it cannot be made.
    """

    def __init__(self, database, options, cwd):
        super().__init__(database, options, cwd=cwd)
        self.devices = cwd / "dev"
        self.devices.mkdir()
        self.receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.receiver.bind(str(cwd / "log.sock"))
        self.receiver.setblocking(False)
        self.datagrams = []

    @property
    def argv(self):
        script = (
            'set -e; d="$1"; shift; '
            'for n in null zero full random urandom; do [ -e "/dev/$n" ] || continue; '
            'touch "$d/$n"; mount --bind "/dev/$n" "$d/$n"; done; '
            'ln -s /proc/self/fd "$d/fd"; ln -s "$0" "$d/log"; mount --bind "$d" /dev; exec "$@"'
        )
        twistd = super().argv
        twistd[twistd.index("mailgate"):twistd.index("mailgate")] = ["--syslog"]
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                self.receiver.getsockname(), str(self.devices), *twistd]

    @property
    def stdout(self):
        while self.receiver.fileno() != -1:
            try:
                self.datagrams.append(self.receiver.recv(65536).decode("utf-8", "replace"))
            except BlockingIOError:
                break
        return "".join(d + "\n" for d in self.datagrams)

    def stop(self):
        try:
            return super().stop()
        finally:
            if self.receiver.fileno() != -1:
                self.stdout
                self.receiver.close()


def test_syslogGetsTheMailFacilityAndEachLevelsPriority(tmp_path):
    """
    A real C{twistd --syslog mailgate}: the datagrams syslog(3) sends to
    /dev/log carry the mail facility and each line's priority (C{<22>}
    mail.info for the listener, C{<20>} mail.warning for the tracing
    warning, C{<19>} mail.err for the failed TLS reload), under the name
    mailgate and the process id.  twistd's own observer sent them all as
    C{<14>} (user.info) but errors, as C{<9>} (user.alert), under the name
    twisted.
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a /dev/log of the test's own needs root and unshare (a mount namespace)")
    server = SyslogServer(databaseURL(tmp_path / "mail.sqlite3"), tlsOptions(tmp_path), cwd=tmp_path)
    server.spawn()
    try:
        waitFor(lambda: server.stdout or server.process.poll() is not None, "a first syslog line")
        if not server.datagrams:
            pytest.skip(f"cannot run twistd in a mount namespace of its own here: {server.stderr.strip()}")
        server.waitUntilListening()
        serveWarnAndFail(tmp_path, server)
    finally:
        server.stop()
    found = [re.match(r"<(\d+)>\w{3} [ \d]\d \d\d:\d\d:\d\d (\S+)\[(\d+)\]: (.*)", d, re.S) for d in server.datagrams]
    assert all(found), server.datagrams
    assert {(m.group(2), int(m.group(3))) for m in found} == {("mailgate", server.process.pid)}

    def priorityOf(needle):
        [match] = [m for m in found if needle in m.group(4)]
        return int(match.group(1))

    assert priorityOf("POP3 listening on") == syslog.LOG_MAIL | syslog.LOG_INFO
    assert priorityOf("tracing the sessions of clients on 192.0.2.0/24") == syslog.LOG_MAIL | syslog.LOG_WARNING
    assert priorityOf("TLS reload failed") == syslog.LOG_MAIL | syslog.LOG_ERR


def test_syslogLinesLoggedWhileTheSenderRestsAreSentWithoutWakingItForEach(monkeypatch):
    """
    While the reactor runs, the sending thread rests after what it sent,
    and lines logged meanwhile are sent together when it is back: woken
    for each line (two or more a session), the thread handed the GIL back
    and forth with the reactor's at each one, which cost a session more
    CPU than the syslog(3) call itself (as QueuedLogObserver measured).
    Once the reactor has stopped, it does not rest.
    """
    resting = threading.Event()
    rested = threading.Event()
    rests = []
    running = [True]

    def rest(seconds):
        if threading.current_thread().name != "syslog":
            # A flush's wait for the queue to empty, on the test's thread.
            time.sleep(seconds)
            return
        rests.append(seconds)
        resting.set()
        assert rested.wait(DEADLINE)
        rested.clear()

    monkeypatch.setattr(logs, "_sleep", rest)
    fake = FakeSyslog()
    observer = logs.SyslogObserver(None, syslog=fake, running=lambda: running[0])
    observer(event(LogLevel.info, "first"))
    assert resting.wait(DEADLINE), "the sending thread did not rest after its first line"
    resting.clear()
    for n in range(5):
        observer(event(LogLevel.info, f"line {n}"))
    assert [message for _, message in fake.sent] == ["[mailgate.test#info] first"]
    rested.set()
    # Back from its rest: the five lines sent at once, then one rest more.
    assert resting.wait(DEADLINE)
    assert [message for _, message in fake.sent][1:] == [f"[mailgate.test#info] line {n}" for n in range(5)]
    assert rests == [observer.batchWait, observer.batchWait]
    running[0] = False
    rested.set()
    observer(event(LogLevel.info, "stopped"))
    assert observer.flush(DEADLINE)
    assert fake.sent[-1][1] == "[mailgate.test#info] stopped"
    assert rests == [observer.batchWait, observer.batchWait]
