"""
mailgate.logs: JSON lines with the connection's context, where twistd's
options say (standard output, -l FILE, twistd.log when daemonizing), and
the log file reopened on SIGHUP for logrotate; the real twistd in both
formats.
"""

import datetime
import io
import json
import os
import poplib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from twisted.logger import LogLevel, Logger, LogPublisher, textFileLogObserver
from twisted.python import log as legacyLog
from twisted.python.failure import Failure

from certs import makeCertificate
from e2e import (
    DEADLINE, HOSTNAME, STOP_GRACE, TWISTD, ServerProcess, databaseURL,
    runCommand, sqliteOnly, waitFor,
)
from e2e import mailgate_cli, mailgate_server  # noqa: F401 (fixtures)
from mailgate import logs, tap


def publish(emit):
    """
    The JSON records of what C{emit(logger)} logs.
    """
    stream = io.StringIO()
    publisher = LogPublisher(logs.jsonFileLogObserver(stream))
    emit(Logger(namespace="mailgate.test", observer=publisher))
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def parseTime(text):
    assert text.endswith("Z")
    return datetime.datetime.fromisoformat(text[:-1] + "+00:00")


# -- the JSON record ---------------------------------------------------------------


def test_aSessionEvent():
    before = time.time()
    [record] = publish(
        lambda log: log.info(
            "{user} logged in from {peer}",
            event="pop3.login",
            session="node1-42",
            protocol="pop3",
            peer="192.0.2.7:40123",
            user="alice@example.org",
            mechanism="scram-sha-256",
            messages=3,
        )
    )
    assert list(record)[:7] == ["time", "level", "event", "session", "protocol", "peer", "user"]
    assert record["level"] == "info"
    assert record["event"] == "pop3.login"
    assert record["session"] == "node1-42"
    assert record["protocol"] == "pop3"
    assert record["peer"] == "192.0.2.7:40123"
    assert record["user"] == "alice@example.org"
    assert record["mechanism"] == "scram-sha-256"
    assert record["messages"] == 3
    assert record["text"] == "alice@example.org logged in from 192.0.2.7:40123"
    assert abs(parseTime(record["time"]).timestamp() - before) < 60


def test_aPreformattedEventsTextIsWrittenOnce():
    """
    mailgate's session events carry their text already made (emitLine):
    the record has it as C{text}, not a second time as a C{line} field.
    """
    def emit(log):
        logs.emitLine(log, LogLevel.info, "pop3 login user=alice", {"event": "pop3.login", "messages": 2})

    [record] = publish(emit)
    assert record["text"] == "pop3 login user=alice"
    assert record["messages"] == 2
    assert "line" not in record


def test_levels():
    records = publish(lambda log: (log.debug("d"), log.warn("w"), log.error("e"), log.critical("c")))
    assert [r["level"] for r in records] == ["debug", "warn", "error", "critical"]


def test_eventsWithoutAnEventKeyAreNamedByNamespace():
    [record] = publish(lambda log: log.info("plain {x}", x=1))
    assert record["event"] == "mailgate.test"
    assert record["x"] == 1
    assert "session" not in record and "user" not in record


def test_fieldsAreMadeJSONSafe():
    class Thing:
        def __str__(self):
            return "a thing"

    [record] = publish(
        lambda log: log.info(
            "odd fields",
            thing=Thing(),
            data=b"\xff\xfebytes",
            nested={"a": [1, 2.5, None, Thing()], 3: "int key"},
            error=ValueError("bad value"),
            big="x" * 10000,
            nan=float("nan"),
        )
    )
    assert record["thing"] == "a thing"
    assert record["data"] == "\\xff\\xfebytes"
    assert record["nested"] == {"a": [1, 2.5, None, "a thing"], "3": "int key"}
    assert record["error"] == "ValueError: bad value"
    assert len(record["big"]) == 2000
    assert record["nan"] == "nan"


def test_theFieldsOfASessionsEventAreWrittenWhole():
    """
    The fields of mailgate's own session events (their text made by the
    session, L{logs.emitLine}) are bounded where they are made (addresses
    at 256 characters, recipients at --max-recipients) and written whole:
    a message delivered to 100 users (RFC 5321's least --max-recipients)
    has each recipient's unique id in its record, not the first 50.  The
    fields of other code's events are still cut.
    """
    recipients = [f"firstname.lastname{i:03d}@department.example.org" for i in range(100)]
    uniqueIds = [{"recipient": address, "uid": f"{i:016x}"} for i, address in enumerate(recipients)]

    def emit(log):
        logs.emitLine(
            log, LogLevel.info, "smtp delivered",
            {"event": "smtp.delivered", "recipients": ",".join(recipients), "uniqueIds": uniqueIds},
        )
        log.info("other code", recipients=",".join(recipients), uniqueIds=uniqueIds)

    own, other = publish(emit)
    assert own["uniqueIds"] == uniqueIds
    assert own["recipients"].split(",") == recipients
    assert len(other["uniqueIds"]) == 50 and len(other["recipients"]) == 2000


def test_secretsAreNeverWritten():
    [record] = publish(
        lambda log: log.info(
            "login attempt by {user}",
            user="alice@example.org",
            password="hunter2",
            pass_="x",
            apopSecret="s3cret",
            credentials="AGFsaWNlAGh1bnRlcjI=",
            saslResponse="AGFsaWNlAGh1bnRlcjI=",
            response="AGFsaWNlAGh1bnRlcjI=",
            details={"password": "hunter2", "ok": True},
        )
    )
    line = json.dumps(record)
    for secret in ("hunter2", "s3cret", "AGFsaWNlAGh1bnRlcjI="):
        assert secret not in line
    assert record["details"] == {"ok": True}
    assert record["user"] == "alice@example.org"


def test_failuresCarryTheirTraceback():
    def emit(log):
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke", event="store.failed")

    [record] = publish(emit)
    assert record["level"] == "critical"
    assert record["event"] == "store.failed"
    assert "ZeroDivisionError" in record["traceback"]
    assert record["text"] == "it broke"


def test_legacyEvents():
    stream = io.StringIO()
    observer = logs.jsonFileLogObserver(stream)
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(observer)
    try:
        legacyLog.msg("old-style message", system="POP3Factory")
        legacyLog.err(Failure(KeyError("k")), "old-style error")
    finally:
        globalLogPublisher.removeObserver(observer)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    message, error = records[-2:]
    assert message["text"] == "old-style message"
    assert message["level"] == "info"
    assert message["system"] == "POP3Factory"
    assert "isError" not in message and "message" not in message
    assert error["level"] == "critical"
    assert "KeyError" in error["traceback"]


def test_textObserverIsTwistedsClassicFormat():
    stream = logs.LogStream(stream=io.StringIO())
    observer = logs.observerFor("text", stream)
    observer({"log_format": "hello {who}", "who": "world", "log_time": 0.0,
              "log_level": LogLevel.info, "log_namespace": "mailgate.test"})
    assert stream._stream.getvalue().endswith("[mailgate.test#info] hello world\n")


@pytest.mark.parametrize(
    "event",
    [
        {"log_format": "{line}", "line": "pop3 login user=a", "log_time": 1764700000.25,
         "log_level": LogLevel.info, "log_namespace": "mailgate.session.core.POP3Server"},
        {"log_format": "{line}", "line": "two\nlines", "log_time": 1764700001.5,
         "log_level": LogLevel.warn, "log_namespace": "n", "log_system": "POP3Factory"},
        {"log_format": "{line}", "line": "no time, no level"},
        {"log_format": "not {line}", "line": "x", "log_time": 1764700002.0},
        {"log_format": "{line}", "line": 42, "log_time": 1764700003.0},
    ],
)
def test_textObserverWritesWhatTwistedsWould(event):
    """
    The text log's faster path for mailgate's pre-formatted events writes
    the octets Twisted's own text observer writes.
    """
    ours = io.StringIO()
    logs.observerFor("text", logs.LogStream(stream=ours))(dict(event))
    theirs = io.StringIO()
    textFileLogObserver(theirs)(dict(event))
    assert ours.getvalue() == theirs.getvalue() != ""


# -- where the log goes -------------------------------------------------------------------


def test_destinationFollowsTwistdsOptions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert logs.twistdDestination({"nodaemon": True, "logfile": ""}).path is None
    assert logs.twistdDestination({"nodaemon": True, "logfile": "-"}).path is None
    named = logs.twistdDestination({"nodaemon": True, "logfile": "mail.log"})
    assert named.path == str(tmp_path / "mail.log")
    daemon = logs.twistdDestination({"nodaemon": False, "logfile": ""})
    assert daemon.path == str(tmp_path / "twistd.log")
    with pytest.raises(SystemExit, match="Daemons cannot log to stdout"):
        logs.twistdDestination({"nodaemon": False, "logfile": "-"})
    # twistd keeps syslog and a --logger of its own.
    assert logs.twistdDestination({"syslog": True, "logfile": ""}) is None
    assert logs.twistdDestination({"logger": object(), "nodaemon": True}) is None


def test_logFileIsReopened(tmp_path):
    path = tmp_path / "mailgate.log"
    stream = logs.LogStream(path=str(path))
    try:
        stream.write("first\n")
        stream.flush()
        os.rename(path, tmp_path / "mailgate.log.1")
        stream.write("second\n")
        stream.flush()
        assert stream.reopen()
        stream.write("third\n")
        stream.flush()
        assert (tmp_path / "mailgate.log.1").read_text() == "first\nsecond\n"
        assert path.read_text() == "third\n"
        # Owner and group only: the log names users and addresses.
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        stream.close()
    assert not logs.LogStream(stream=io.StringIO()).reopen()


def test_theLogFileIsNeverOpenedThroughASymbolicLink(tmp_path, capsys):
    """
    twistd opens the log (-l FILE) as root, before --uid takes effect, in
    a directory that is often that user's (it must make the new file
    after logrotate moved the old away): a link put there in the log's
    place had root append every log line to the file it pointed to, any
    file of the machine (reproduced with twistd --uid nobody: a root-only
    file got the start-up lines).  The link is refused, and so is a FIFO
    put there, at once (opening it would wait for a reader for ever); the
    start ends in one line, exit 78, as it does for a log directory that
    is not there (a traceback and exit 1 before, which systemd retried).
    A reopen (SIGHUP, SIGUSR1) refuses the link too and keeps the old file.
    """
    from twisted.logger import capturedLogs

    victim = tmp_path / "victim"
    victim.write_text("root's own\n")
    link = tmp_path / "mailgate.log"
    link.symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        logs.LogStream(path=str(link))
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        logs.LogStream(path=str(fifo))
    for path in (link, tmp_path / "gone" / "mailgate.log"):
        options = tap.Options()
        options.parseOptions(["--database", f"sqlite:///{tmp_path / 'mail.sqlite3'}"])
        options.parent = {"nodaemon": True, "logfile": str(path)}
        with pytest.raises(SystemExit) as raised:
            tap.makeService(options)
        assert raised.value.code == os.EX_CONFIG
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"mailgate: cannot open the log file {path}: "), line
    assert victim.read_text() == "root's own\n"
    # A reopen after the file was moved away finds the link in its place.
    path = tmp_path / "reopened.log"
    stream = logs.LogStream(path=str(path))
    try:
        os.rename(path, tmp_path / "reopened.log.1")
        path.symlink_to(victim)
        with capturedLogs() as events:
            tap._reopenLog(stream)
        assert [e["event"] for e in events if e.get("event", "").startswith("log.")] == ["log.reopen_failed"]
        stream.write("still the old file\n")
        stream.flush()
    finally:
        stream.close()
    assert victim.read_text() == "root's own\n"
    assert (tmp_path / "reopened.log.1").read_text() == "still the old file\n"


def test_jsonNeedsAFileOrStandardOutput(tmp_path, capsys):
    """
    The JSON format with twistd's --syslog or --logger, which keep twistd's
    own text observer, is refused in one line, exit 78 (EX_CONFIG: the
    same command line and file would be refused again; it was 1, which
    the systemd unit retried for ever), naming where the value came from:
    the --config file's key, which was reported as --log-format, an option
    not given.
    """
    def refused(argv, parent):
        options = tap.Options()
        options.parseOptions(argv)
        options.parent = parent
        with pytest.raises(SystemExit) as e:
            tap.makeService(options)
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return e.value.code, err

    assert refused(["--log-format", "json"], {"syslog": True, "nodaemon": True}) == (78, (
        "mailgate: --log-format json writes to a file or standard output, and twistd's --syslog keeps its "
        "own text log: leave out --log-format or --syslog\n"
    ))
    config = tmp_path / "mailgate.toml"
    config.write_text('log-format = "json"\n')
    assert refused(["--config", str(config)], {"logger": "x.y", "nodaemon": True}) == (78, (
        f'mailgate: log-format = "json" in {config} writes to a file or standard output, and twistd\'s '
        '--logger keeps its own text log: remove the key from the file (or set it to "text"), or leave out '
        "--logger\n"
    ))
    # Given on the command line too, which wins: named there.
    code, err = refused(["--config", str(config), "--log-format", "json"], {"syslog": True, "nodaemon": True})
    assert code == 78 and err.startswith("mailgate: --log-format json writes"), err


# -- the real twistd ------------------------------------------------------------------------


def jsonLines(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    return [json.loads(line) for line in lines]


#: The refused login of L{refusedThenRightLogin} is answered after this
#: delay, not the default second: what is logged is the same.
FAST_FAILURES = ("--auth-failure-delay", "0.1")


def refusedThenRightLogin(server, mailgate_cli):
    """
    Two POP3 sessions of alice's: one refused (a wrong password), then one
    that logs in, asks STAT and quits.
    """
    mailgate_cli.addUser("alice@example.org", "correct horse")
    pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    pop.user("alice@example.org")
    with pytest.raises(poplib.error_proto):
        pop.pass_("wrong battery")
    pop.quit()
    pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    pop.user("alice@example.org")
    pop.pass_("correct horse")
    pop.stat()
    pop.quit()


@sqliteOnly
def test_everyStandardOutputLineIsJSON(mailgate_server, mailgate_cli):
    server = mailgate_server("--log-format", "json", "--no-apop", *FAST_FAILURES)
    refusedThenRightLogin(server, mailgate_cli)
    assert server.stop() in (0, -signal.SIGTERM)
    records = jsonLines(server.stdout)
    # twistd's own start-up lines too.
    assert "starting up" in records[0]["text"]
    assert records[0]["event"].startswith("twisted.")
    listening = [r for r in records if r["event"] == "listener.started"]
    assert listening and listening[0]["protocol"] == "POP3"
    assert records[-1]["text"] == "Server Shut Down."
    for record in records:
        assert {"time", "level", "event", "text"} <= set(record), record
        parseTime(record["time"])
    # No password, in any field.
    assert "correct horse" not in server.stdout and "wrong battery" not in server.stdout


@sqliteOnly
def test_textLinesNameTheirSession(mailgate_server, mailgate_cli):
    """
    In the text format each line of a connection names its session
    (C{session=<id>} in the brackets), so one client's lines can be picked
    out of a busy log: a refused login and a good one are two sessions,
    and every line of each carries its own id.
    """
    server = mailgate_server("--no-apop", *FAST_FAILURES)
    refusedThenRightLogin(server, mailgate_cli)
    assert server.stop() in (0, -signal.SIGTERM)
    sessions = {}
    for line in server.stdout.splitlines():
        found = re.search(r"^\S+ \[[^\]]* session=([0-9a-f]{12}\.\d+)\] (.*)$", line)
        if found:
            sessions.setdefault(found.group(1), []).append(found.group(2))
    failed = [i for i, lines in sessions.items() if any("alice@example.org" in t and "fail" in t for t in lines)]
    good = [i for i, lines in sessions.items() if any("pop3 login user=alice@example.org" in t for t in lines)]
    assert len(failed) == 1 and len(good) == 1 and failed != good, sessions
    # The good session's end carries its id too.
    assert any(t.startswith("pop3 logout user=alice@example.org") for t in sessions[good[0]]), sessions
    # Lines of no connection name none.
    assert any("listening on" in line and "session=" not in line for line in server.stdout.splitlines())


class LoggingServer(ServerProcess):
    """
    A twistd whose log goes to a file (-l FILE), read back for the
    listening lines as the harness reads standard output.
    """

    def __init__(self, database, logfile, options=(), cwd=None, daemon=False, pidfile=None):
        super().__init__(database, options, cwd=cwd)
        self.logfile = logfile
        self.daemon = daemon
        self.pidfile = pidfile

    @property
    def argv(self):
        argv = super().argv
        twistd = [TWISTD, "-l", str(self.logfile)]
        twistd += ["--pidfile", str(self.pidfile)] if self.daemon else ["-n", "--pidfile="]
        return twistd + argv[argv.index("mailgate"):]

    @property
    def stdout(self):
        try:
            logged = self.logfile.read_text()
        except FileNotFoundError:
            logged = ""
        return logged + "".join(self._out.lines)


@pytest.fixture
def loggingServer(tmp_path):
    servers = []

    def start(*options, logfile, **kw):
        server = LoggingServer(databaseURL(tmp_path / "mail.sqlite3"), logfile, options, cwd=tmp_path, **kw)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.mark.parametrize("logFormat", ["json", "text"])
def test_hangupReopensTheLogFile(tmp_path, loggingServer, logFormat):
    cert, key = makeCertificate(tmp_path, HOSTNAME)
    logfile = tmp_path / "mailgate.log"
    server = loggingServer(
        "--log-format", logFormat, "--tls-cert", str(cert), "--tls-key", str(key), logfile=logfile
    )
    server.start()
    assert server._out.lines == [], "with -l FILE nothing goes to standard output"
    # logrotate: the file is moved away, then the server told.
    rotated = tmp_path / "mailgate.log.1"
    os.rename(logfile, rotated)
    server.process.send_signal(signal.SIGHUP)
    waitFor(lambda: logfile.exists() and "log file reopened" in logfile.read_text(), "a new log file")
    new = logfile.read_text()
    old = rotated.read_text()
    assert "listening on" in old and "listening on" not in new
    # The same SIGHUP still reloads the certificate, logged in the new file.
    waitFor(lambda: "TLS certificate reloaded" in logfile.read_text(), "the reload line")
    assert server.stop() in (0, -signal.SIGTERM)
    new = logfile.read_text()
    assert "Server Shut Down." in new
    if logFormat == "json":
        assert jsonLines(old)[0]["text"].startswith("twistd ")
        records = jsonLines(new)
        assert {"event": "log.reopened", "path": str(logfile)}.items() <= records[0].items()
        assert records[1]["event"] == "tls.reloaded"
    else:
        assert new.splitlines()[0].endswith("[mailgate.tap#info] log file reopened: " + str(logfile))


def test_aLogFileThatCannotBeReopenedKeepsTheOldOneAndSaysWhy(tmp_path):
    """
    The log's directory is gone when the server is told to reopen it:
    lines go on to the old file, and one error names the path and the
    reason (not a traceback of an anonymous action).
    """
    from twisted.logger import capturedLogs, formatEvent

    directory = tmp_path / "logs"
    directory.mkdir()
    stream = logs.LogStream(str(directory / "mailgate.log"))
    os.rename(directory, tmp_path / "moved")
    with capturedLogs() as events:
        tap._reopenLog(stream)
    [event] = [e for e in events if e.get("event") == "log.reopen_failed"]
    assert formatEvent(event) == (
        f"log file not reopened, still writing to the old one: {directory / 'mailgate.log'}: "
        "No such file or directory"
    )
    stream.write("still written\n")
    stream.flush()
    assert "still written" in (tmp_path / "moved" / "mailgate.log").read_text()


def test_usr1ReopensTheLogFile(tmp_path, loggingServer):
    """
    SIGUSR1, which a logrotate rule written for another twistd service
    sends, reopens the log file too (and does not end the server, as its
    default action would).
    """
    logfile = tmp_path / "mailgate.log"
    server = loggingServer(logfile=logfile)
    server.start()
    os.rename(logfile, tmp_path / "mailgate.log.1")
    server.process.send_signal(signal.SIGUSR1)
    waitFor(lambda: logfile.exists() and "log file reopened" in logfile.read_text(), "a new log file")
    pop = poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE)
    pop.quit()
    assert server.stop() in (0, -signal.SIGTERM)


def _processEnded(pid):
    """
    Whether process C{pid} (not a child of the test: a daemon) has ended:
    gone, or a zombie its new parent has yet to reap.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_daemonWritesJSONToItsLogFile(tmp_path, loggingServer):
    """
    Daemonized (no -n), twistd forks and the parent returns; the daemon's
    log file holds JSON lines from the first to the last.
    """
    logfile = tmp_path / "daemon.log"
    pidfile = tmp_path / "twistd.pid"
    server = loggingServer("--log-format", "json", logfile=logfile, daemon=True, pidfile=pidfile)
    code, out, err = runCommand(server.argv, cwd=tmp_path)
    assert code == 0, (out, err)
    pid = int(waitFor(lambda: pidfile.exists() and pidfile.read_text().strip(), "the pid file"))
    try:
        waitFor(lambda: logfile.exists() and "listening on" in logfile.read_text(), "the listening line")
        # Greeted: the reactor runs (and handles SIGTERM).
        port = int(re.search(r"POP3 listening on 127\.0\.0\.1:(\d+)", logfile.read_text()).group(1))
        pop = poplib.POP3("127.0.0.1", port, timeout=DEADLINE)
        pop.quit()
    finally:
        os.kill(pid, signal.SIGTERM)
        # Not the pid file's removal: twistd removes it before it logs
        # "Server Shut Down.", the line this test looks for last.
        waitFor(lambda: _processEnded(pid), "the daemon to stop", timeout=STOP_GRACE)
    assert not pidfile.exists()
    records = jsonLines(logfile.read_text())
    assert "starting up" in records[0]["text"]
    assert records[-1]["text"] == "Server Shut Down."


@sqliteOnly
def test_hangupWithTheLogOnStandardOutputSaysThereIsNothingToReload(mailgate_server):
    """
    As the shipped systemd unit runs it (-n, the log on standard output to
    the journal, here without TLS): C{systemctl reload} is answered with a
    line saying there was nothing to reload, not silence; SIGUSR1 says
    there is no log file to reopen.  Neither ends the server.
    """
    # At once on the "listening" line, before the reactor may run: the
    # handlers are in place from the moment the listeners bind.
    server = mailgate_server()
    server.process.send_signal(signal.SIGHUP)
    waitFor(lambda: "SIGHUP: nothing to reload" in server.stdout, "the SIGHUP line")
    server.process.send_signal(signal.SIGUSR1)
    waitFor(lambda: "SIGUSR1: no log file of mailgate's to reopen" in server.stdout, "the SIGUSR1 line")
    poplib.POP3("127.0.0.1", server.port, timeout=DEADLINE).quit()


def _forwarded(events):
    """
    A logging.Logger of its own (no parent, so no other handler sees its
    records) whose records are forwarded into C{events}.
    """
    import logging

    pythonLogger = logging.Logger("psycopg")
    forwarder = logs.forwardStandardLogging(logging.Logger("root"), observer=events.append)
    pythonLogger.addHandler(forwarder)
    return pythonLogger


def test_pythonLoggingRecordsBecomeLogEvents():
    """
    A library's warning through Python's logging (psycopg's, when it drops
    an error ending a pipeline) is an event of mailgate's log: its
    library's namespace, its level, its message; one JSON line.
    """
    events = []
    _forwarded(events).warning("error ignored terminating %s: %s", "<psycopg.Pipeline [BAD] at 0x7f3a2b1c9e10>",
                               "server closed")
    [event] = events
    assert event["log_namespace"] == "psycopg"
    assert event["log_level"] == LogLevel.warn
    record = json.loads(logs.eventAsJSONLine(event))
    assert record["event"] == "psycopg"
    assert record["level"] == "warn"
    # Without the object's memory address, which says nothing to a reader.
    assert record["text"] == "error ignored terminating <psycopg.Pipeline [BAD]>: server closed"


def test_pythonLoggingExceptionsCarryTheirTraceback():
    events = []
    pythonLogger = _forwarded(events)
    try:
        raise ConnectionResetError("gone")
    except ConnectionResetError:
        pythonLogger.exception("connection lost")
    [event] = events
    assert event["log_level"] == LogLevel.error
    record = logs.eventAsRecord(event)
    assert record["text"] == "connection lost"
    assert "ConnectionResetError: gone" in record["traceback"]


def test_pythonLoggingIsForwardedOnlyWhereNothingElseHandlesIt():
    """
    An application that routes Python's logging itself keeps its routing:
    a root logger with a handler gets no forwarder.
    """
    import logging

    root = logging.Logger("root")
    root.addHandler(logging.NullHandler())
    assert logs.forwardStandardLogging(root) is None
    assert len(root.handlers) == 1
    bare = logging.Logger("root")
    assert logs.forwardStandardLogging(bare) is not None
    assert logs.forwardStandardLogging(bare) is None
    assert len(bare.handlers) == 1


def test_theLogFileMayBeStandardOutputThroughItsDeviceAlias():
    """
    C{-l /dev/stdout} (or /dev/stderr, /dev/fd/N) is a container's way of
    logging to its output, most often a pipe: those names are symbolic
    links, in /dev and /proc where only root and the kernel make them, and
    they are followed, the pipe taken, where a link anywhere else is
    refused (test_theLogFileIsNeverOpenedThroughASymbolicLink).  They were
    refused as links since the log file was opened with O_NOFOLLOW, and
    the start ended with exit 78.
    """
    reader, writer = os.pipe()
    try:
        stream = logs.LogStream(path=f"/dev/fd/{writer}")
        try:
            stream.write("to the pipe\n")
            stream.flush()
        finally:
            stream.close()
        assert os.read(reader, 100) == b"to the pipe\n"
    finally:
        os.close(reader)
        os.close(writer)
    child = subprocess.run(
        [sys.executable, "-c", "from mailgate import logs; s = logs.LogStream(path='/dev/stdout'); s.write('out\\n'); s.close()"],
        capture_output=True, text=True, timeout=60,
        cwd=os.path.dirname(os.path.dirname(logs.__file__)),
    )
    assert (child.returncode, child.stdout) == (0, "out\n"), child.stderr


def test_aLogFileThatIsASocketIsRefusedAsOne(tmp_path):
    """
    A systemd service's standard output is the journal's socket, which
    cannot be opened as a file, reader or not: C{-l /dev/stdout} there is
    refused saying so, and what to do (leave out -l), where the reason
    was a FIFO or socket "without a reader".
    """
    ours, journal = socket.socketpair()
    with ours, journal:
        with pytest.raises(OSError) as e:
            logs.LogStream(path=f"/dev/fd/{ours.fileno()}")
    assert e.value.strerror == (
        "not a regular file (a socket, which cannot be opened as a file; where it is systemd's "
        "journal, leave out -l: the log goes to standard output)"
    )
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as e:
        logs.LogStream(path=str(fifo))
    assert e.value.strerror == "not a regular file (a FIFO without a reader)"
