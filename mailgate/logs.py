# -*- test-case-name: tests.test_logs,tests.test_log_priorities,tests.test_session_core -*-
"""
Where twistd's log goes and what a line looks like: human text (the
default) or one JSON object per line (C{--log-format json}).

twistd picks its log observer before the plugin's service exists, but it
asks the application first: an L{ILogObserver} component set on the
application wins over the one twistd would build from C{--logfile},
C{--nodaemon} and C{--syslog} (C{twisted.application.app.AppLogger.start}).
L{mailgate.tap.makeService} therefore builds the observer itself, with
L{twistdDestination} honouring those same options (C{-l FILE}, C{-l -},
standard output under C{--nodaemon}, C{twistd.log} when daemonizing), and
L{mailgate.service.MailgateService} sets it on the application it joins.
Every line, twistd's own start-up lines included, then goes through it.
C{--logger} is left to twistd; C{--syslog} is mailgate's too
(L{SyslogObserver}), with the text format.

Taking the file over also means SIGHUP can reopen it, which is what
logrotate's C{postrotate} needs; twistd's own size-based rotation (and its
SIGUSR1) is not used.

A JSON line holds C{time} (RFC 3339, UTC), C{level}, C{event} (the event's
stable C{event} key, such as C{pop3.login}; for events without one, their
logger's namespace), C{session}, C{protocol}, C{peer} and C{user} where
the event has them, the event's other fields made JSON-safe, C{text} (the
formatted message) and, for failures, C{traceback}.  Fields whose names
say they hold a password, secret or credential are never written.

Where administrators read logs, a line's level is its priority: on
standard output that is systemd's journal (L{isJournalStream}), each line
begins with its syslog priority (C{<3>} for an error), which journald
takes off and keeps as the record's C{PRIORITY}, so that C{journalctl -p
err} finds errors (without it every line was C{info} there); and under
twistd's C{--syslog}, L{SyslogObserver} sends each line with its priority
to the mail facility, where Dovecot's and Postfix's go.
"""

import atexit
import collections
import datetime
import errno
import itertools
import json
import logging
import math
import os
import re
import stat
import sys
import threading
import weakref
from queue import Empty, SimpleQueue
from time import monotonic as _monotonic
from time import sleep as _sleep
from time import time as _now

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.failure import Failure
from zope.interface import implementer

#: the syslog(3) priority (RFC 5424 severity) of each level: what journald
#: reads from a line's C{<N>} prefix, and what L{SyslogObserver} sends
PRIORITIES = {LogLevel.critical: 2, LogLevel.error: 3, LogLevel.warn: 4, LogLevel.info: 6, LogLevel.debug: 7}

#: the keys every connection's events carry (the logging contract)
CONTEXT_KEYS = ("session", "protocol", "peer", "user")
# Keys of legacy (twisted.python.log) events that repeat what the record
# already says.
_LEGACY_KEYS = frozenset({"message", "isError", "format", "printed", "time", "why", "failure"})
# Field names that must never reach a log, whatever a caller passed.
# (A SASL exchange's client messages are "responses".)
_SECRET = re.compile(r"pass(word|wd)|^pass$|secret|credential|response$", re.IGNORECASE)
_MAX_TEXT = 2000
_MAX_ITEMS = 50


def _isDeviceAlias(path):
    """
    Whether C{path} is a symbolic link in /dev (C{/dev/stdout},
    C{/dev/stderr}) or, through /dev/fd, in /proc (C{/dev/fd/1}), where
    only root and the kernel make links: the log file may be opened
    through such a link, never through one anywhere else.
    """
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    return (directory == "/dev" or directory.startswith("/proc/")) and os.path.islink(path)


def _unopenable(path, alias):
    """
    Why C{path}, which open() refused with ENXIO, is not a log file: a FIFO
    without a reader, or a socket, which no reader makes openable.  A
    systemd service's standard output is the journal's socket, so
    C{-l /dev/stdout} there was told to find the socket a reader.
    """
    try:
        socketFile = stat.S_ISSOCK(os.stat(path, follow_symlinks=alias).st_mode)
    except OSError:
        socketFile = False
    if socketFile:
        return (
            "not a regular file (a socket, which cannot be opened as a file; where it is systemd's "
            "journal, leave out -l: the log goes to standard output)"
        )
    return "not a regular file (a FIFO without a reader)"


def priorityOf(event):
    """
    The syslog priority of C{event}, by its level (L{PRIORITIES}); an event
    of Twisted's older API without one is an error if it says it is one.
    """
    priority = PRIORITIES.get(event.get("log_level"))
    if priority is None:
        priority = 3 if event.get("isError") else 6
    return priority


def isJournalStream(stream, environ=None):
    """
    Whether C{stream} (a file object or descriptor) is systemd's journal:
    systemd announces the stream it connected a service's standard output
    (or error) to in C{$JOURNAL_STREAM}, as its C{device:inode}
    (systemd.exec(5), sd_journal_stream_fd(3)).  The variable alone says
    nothing: a process started by the service (a shell's, a test's) inherits
    it with its output sent elsewhere, where a C{<N>} prefix would be
    written as it is; only the descriptor's own device and inode tell.
    """
    environ = os.environ if environ is None else environ
    try:
        device, inode = (int(part) for part in environ.get("JOURNAL_STREAM", "").split(":"))
        fd = stream if isinstance(stream, int) else stream.fileno()
        status = os.fstat(fd)
    except (ValueError, OSError, AttributeError):
        # Not set, not two numbers, or a stream without a descriptor (or
        # a closed one): not the journal.
        return False
    return (status.st_dev, status.st_ino) == (device, inode)


def writeStartFailure(stream, line):
    """
    Write C{line}, the one line saying why the start failed (before the log
    exists, or beside it), to C{stream}, standard error: as an error
    (C{<3>}) where that is the journal's stream, so that C{journalctl -u
    mailgate -p err} says why the service did not start.
    """
    if isJournalStream(stream):
        # journald makes a record of each line: a line break in the text
        # (a database path holding one, named in the message) began a
        # record of no priority, info, after the error's first part.
        line = "\n".join("<3>" + part for part in line.split("\n"))
    stream.write(f"{line}\n")
    stream.flush()


def withPriorities(formatter):
    """
    C{formatter} (an event to text) with each line of the text it makes
    beginning with the event's syslog priority (C{<4>} for a warning), as
    journald reads it (C{SyslogLevelPrefix=yes}, systemd's default) and
    takes it off again: the journal's record holds the line as a file would,
    with its C{PRIORITY}.

    journald makes one record of each line of a stream, so a text event of
    several lines (a traceback: its lines after the first begin with a
    tab) is several records: each is prefixed, so that C{journalctl -p err}
    shows a traceback whole and not its first line alone.  (One record per
    event would take journald's native protocol, a socket of its own
    besides standard output, whose records journald orders apart from the
    stream's.)  A JSON event is one line already, its traceback inside.
    """

    def format(event):
        text = formatter(event)
        if not text:
            return text
        prefix = f"<{priorityOf(event)}>"
        lines = text.split("\n")
        ended = lines[-1] == ""
        if ended:
            lines.pop()
        return "\n".join(prefix + line for line in lines) + ("\n" if ended else "")

    return format


class LogStream:
    """
    A stream for log lines, written whole under a lock, that can be
    reopened by path.  Twistd's observer writes to it on a thread of its
    own (L{QueuedLogObserver}); an observer without a reactor, on the
    thread that logged.

    @ivar path: the file, or C{None} for a stream given as is (standard
        output), which L{reopen} leaves alone.
    @ivar journal: whether the stream is systemd's journal
        (L{isJournalStream}), whose lines L{observerFor} prefixes with their
        priority.
    """

    journal = False

    #: how the stream's own line saying lines were lost is formatted (an
    #: event to a line, as its observer formats them: L{observerFor} sets
    #: it), so that a JSON log stays JSON
    formatEvent = None

    #: lines the stream did not take (a full disk, a reader of standard
    #: output gone), since the start
    linesNotWritten = 0
    #: lines never handed to the stream: its observer's queue was full
    #: (L{QueuedLogObserver}), since the start
    linesDropped = 0
    #: whether the last reopen (SIGHUP, SIGUSR1) failed, leaving the
    #: lines going to the old file that logrotate will compress or remove
    #: (C{mailgate_log_last_reopen_successful})
    reopenFailed = False

    def __init__(self, path=None, stream=None, journal=False):
        self.path = path
        self.journal = journal
        self._lock = threading.Lock()
        # A file reopened while a line was being written to the old one
        # (L{reopen} never waits for the write): taken by the next write.
        self._swapLock = threading.Lock()
        self._replacement = None
        #: what the lines are written to, as a line saying some were lost
        #: names it
        self.where = path if path is not None else "standard output"
        if path is not None:
            self._stream, self._text = self._open(path), False
        else:
            self._stream, self._text = self._unbuffered(stream)
        # Lines not written (a full disk): told once writing works again.
        self._lost = 0
        self._lostBecause = None
        self._cutShort = False

    @property
    def linesLost(self):
        """
        Lines lost since the start, not written (L{linesNotWritten},
        L{linesDropped}): what C{mailgate_log_lines_lost_total} exports,
        for an alert the lost lines themselves cannot raise.
        """
        return self.linesNotWritten + self.linesDropped

    @staticmethod
    def _unbuffered(stream):
        """
        C{stream} (standard output) as the stream lines are written to, and
        whether it takes text: where it has a descriptor, an unbuffered
        binary file on a duplicate of it, so that a line is one write(2)
        whose failure (a reader gone) loses that line alone, and so that a
        write blocked on a reader that takes nothing holds no lock of
        C{sys.stdout}'s (the interpreter takes it to flush at exit, and
        aborts if a thread holds it); a stream without one (a test's) as
        it is, taking text.
        """
        try:
            fd = stream.fileno()
            stream.flush()
            return open(os.dup(fd), "wb", buffering=0), False
        except (AttributeError, OSError, ValueError):
            return stream, True

    @staticmethod
    def _open(path):
        """
        Open the log file for appending, made with mode 0640 if it is not
        there.  Never through a symbolic link, and only a regular file (or
        a device, such as /dev/null): twistd opens the log as root before
        C{--uid} takes effect, often in a directory of that user's (who
        must make the new file after logrotate moved the old one away), so
        a link put in its place would have root append to any file of the
        machine, and a FIFO would hold the start for ever.

        The one link followed is one in /dev, a directory only root may
        write: C{-l /dev/stdout} (or /dev/stderr, /dev/fd/N), a container's
        way of logging to its output, which is a pipe (a FIFO with its
        reader there; a named FIFO without a reader is refused at once,
        never waited for, while a pipe whose reader has gone opens, and
        writes to it fail as any write to a closed output does).

        @raise OSError: the file cannot be opened, or is refused.
        """
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        alias = _isDeviceAlias(path)
        try:
            fd = os.open(path, flags if alias else flags | os.O_NOFOLLOW, 0o640)
        except OSError as e:
            if e.errno == errno.ELOOP and not alias:
                raise OSError(errno.ELOOP, "a symbolic link (a log file is never written through one)", path) from None
            if e.errno == errno.ENXIO:
                raise OSError(errno.ENXIO, _unopenable(path, alias), path) from None
            raise
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode) or (alias and stat.S_ISFIFO(mode))):
                raise OSError(errno.EINVAL, "not a regular file", path)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        # Unbuffered: each line is one write(2) (the observer flushed after
        # every line anyway), so that a line the disk has no room for is
        # known lost at once, not left in a buffer to be written later or
        # dropped, part of it, when the file is closed.
        return os.fdopen(fd, "ab", buffering=0)

    def write(self, text):
        """
        Write C{text} (one log line): L{writeLines}.
        """
        self.writeLines((text,))

    def writeLines(self, texts):
        """
        Write C{texts} (log lines, each ended), in one system call where the
        stream takes them all.  A write that fails (no space left on the
        log's filesystem, its quota, an I/O error, a reader of standard
        output gone) loses the lines it did not take whole and raises
        nothing: the server goes on serving, and once a line can be written
        again it is preceded by one saying how many were lost and why
        (C{log.lines_lost}); a line the disk cut short is ended first.
        """
        with self._lock:
            if self._replacement is not None:
                self._takeReplacement()
            if self._text:
                self._stream.write("".join(texts))
                return
            if self._lost:
                if self._writeAll(self._lostLine()) is not None:
                    self._lost += len(texts)
                    self.linesNotWritten += len(texts)
                    return
                self._lost, self._lostBecause = 0, None
            taken = self._writeAll("".join(texts).encode("utf-8", "backslashreplace"))
            if taken is not None:
                ends = itertools.accumulate(len(text.encode("utf-8", "backslashreplace")) for text in texts)
                lost = sum(1 for end in ends if end > taken)
                self._lost += lost
                self.linesNotWritten += lost

    def notWritten(self, why):
        """
        Count one line lost before it could be written (its event could not
        be formatted), told with the others lost (L{writeLines}).
        """
        with self._lock:
            self._lost += 1
            self.linesNotWritten += 1
            self._lostBecause = self._lostBecause or why

    def _writeAll(self, data):
        """
        Write all of C{data}: C{None} once it is written, or how many of its
        octets the file took if it did not take them all (then the line it
        cut short is ended by the next one written).
        """
        ended = self._cutShort
        if ended:
            data = b"\n" + data
        view = memoryview(data)
        while view:
            try:
                written = self._stream.write(view)
            except OSError as e:
                self._lostBecause = e.strerror or str(e)
                written = None
            if not written:
                if written is not None:
                    self._lostBecause = "nothing written"
                taken = len(data) - len(view)
                if taken:
                    self._cutShort = taken > ended
                return max(taken - ended, 0)
            view = view[written:]
        self._cutShort = False
        return None

    def _lostLine(self):
        count, why = self._lost, self._lostBecause or "a failed write"
        text = f"{count} log {'line' if count == 1 else 'lines'} lost, not written to {self.where}: {why}"
        event = {
            "log_format": "{line}", "line": text, "log_level": LogLevel.warn, "log_namespace": "mailgate.logs",
            "log_time": _now(), "event": "log.lines_lost", "lost": count, "error": why,
        }
        line = self.formatEvent(event) if self.formatEvent is not None else None
        return (line or f"{text}\n").encode("utf-8", "backslashreplace")

    def flush(self):
        with self._lock:
            if self._text:
                self._stream.flush()

    def reopen(self):
        """
        Open the path again (after logrotate moved the file away): later
        lines go to a new file of that name.  The old stream is closed only
        once the new one is open, so a failure loses nothing.  Never waits
        for a line being written (to a FIFO whose reader takes nothing,
        C{-l /dev/stdout}: SIGUSR1 would have stopped the reactor with it):
        the next line written takes the new file then.

        @return: whether a file was reopened.
        """
        if self.path is None:
            return False
        try:
            replacement = self._open(self.path)
        except OSError:
            self.reopenFailed = True
            raise
        self.reopenFailed = False
        with self._swapLock:
            superseded, self._replacement = self._replacement, replacement
        if superseded is not None:
            superseded.close()
        if self._lock.acquire(blocking=False):
            try:
                self._takeReplacement()
            finally:
                self._lock.release()
        return True

    def _takeReplacement(self):
        """
        Write to the file L{reopen} opened from now on, the old one closed
        (called with L{_lock} held).
        """
        with self._swapLock:
            replacement, self._replacement = self._replacement, None
        if replacement is not None:
            old, self._stream = self._stream, replacement
            old.close()

    def close(self):
        with self._lock:
            if self._replacement is not None:
                self._takeReplacement()
            if self.path is not None or not self._text:
                self._stream.close()

    def afterFork(self):
        """
        In a forked child: a lock the parent's writing thread held (a line
        being written as it forked) would be held for ever.
        """
        self._lock = threading.Lock()
        self._swapLock = threading.Lock()


def literal(text):
    """
    C{text} as a part of an event's format string that stands for itself:
    a sentence's words worked out by the caller (a list of names, a
    clause present or not) go into the format, not into fields of their
    own, which the JSON record would carry as data.
    """
    return text.replace("{", "{{").replace("}", "}}")


def emitLine(logger, level, text, fields):
    """
    Emit an event whose text is already formatted: the event
    C{logger.emit(level, "{line}", line=text, **fields)} would emit, the
    same keys and values, to the same observer, without what C{emit}
    does besides (it checks the level against a list of every L{LogLevel}
    made anew, and copies its keyword arguments).  A short POP3 session
    logs two events, and emitting them cost more than writing them: a
    session's event, text observer and file included, went from 6.7 to
    4.0 µs.

    @param logger: the L{Logger} whose namespace, source and observer the
        event gets.
    @param level: a L{LogLevel} constant.
    @param fields: the event's other fields, a L{dict} that becomes the
        event (the caller's own, not to be used again).
    """
    fields["line"] = text
    fields["log_logger"] = logger
    fields["log_level"] = level
    fields["log_namespace"] = logger.namespace
    fields["log_source"] = logger.source
    fields["log_format"] = "{line}"
    fields["log_time"] = _now()
    logger.observer(fields)


#: the address an object's default repr ends with (C{<X object at 0x7f...>})
_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+(?=>)")


class StandardLoggingForwarder(logging.Handler):
    """
    Records of Python's C{logging} module, as Twisted log events: the
    libraries mailgate runs on log through it (psycopg warns there when it
    drops an error while ending a pipeline on a connection PostgreSQL
    closed).  Left alone, such a record is a bare line on standard error
    (C{logging.lastResort}), outside mailgate's log file and, under
    C{--log-format json}, the one line of the stream that is not JSON.

    The event's namespace is the record's logger name (C{psycopg}), its
    level the record's, its text the record's message; an exception the
    record carries is the event's failure (a C{traceback} in JSON).
    Records come from the store's worker threads too: the log observer
    takes events from any thread (L{LogStream}).
    """

    _LEVELS = (
        (logging.CRITICAL, LogLevel.critical),
        (logging.ERROR, LogLevel.error),
        (logging.WARNING, LogLevel.warn),
        (logging.INFO, LogLevel.info),
    )

    def __init__(self, observer=None, level=logging.WARNING):
        super().__init__(level)
        self._observer = observer

    def emit(self, record):
        try:
            level = next((ours for theirs, ours in self._LEVELS if record.levelno >= theirs), LogLevel.debug)
            # Without the memory addresses of objects' reprs (psycopg's
            # "<psycopg.Pipeline [BAD] at 0x7f3a...>"): they tell an
            # administrator nothing, and make each such line unlike the
            # last to whatever groups or counts lines.
            text = _MEMORY_ADDRESS.sub("", record.getMessage())
            failure = None
            if record.exc_info and record.exc_info[1] is not None:
                failure = Failure(record.exc_info[1], record.exc_info[0], record.exc_info[2])
            logger = Logger(namespace=record.name, observer=self._observer)
            if failure is None:
                logger.emit(level, "{text}", text=text)
            else:
                logger.failure("{text}", failure, level, text=text)
        except Exception:
            self.handleError(record)


def forwardStandardLogging(root=None, observer=None):
    """
    Send Python C{logging} records of level WARNING and above into
    Twisted's log (L{StandardLoggingForwarder}), unless the process has
    already said where they go: nothing is added when C{root} (the root
    logger) has a handler of its own.  C{twistd mailgate} calls it; an
    application embedding mailgate may, or route C{logging} itself.

    @return: the forwarder added, or C{None}.
    """
    root = logging.getLogger() if root is None else root
    if root.handlers:
        return None
    forwarder = StandardLoggingForwarder(observer)
    root.addHandler(forwarder)
    return forwarder


def twistdDestination(twistdOptions):
    """
    Where twistd would write its log, given its options, as a L{LogStream};
    or C{None} where twistd must keep its own observer (C{--syslog},
    C{--logger}).

    @param twistdOptions: twistd's C{ServerOptions} (a mapping).
    @raise SystemExit: C{-l -} without C{--nodaemon}, as twistd refuses it.
    """
    if twistdOptions.get("logger") or twistdOptions.get("syslog"):
        return None
    logfile = twistdOptions.get("logfile") or ""
    nodaemon = twistdOptions.get("nodaemon", False)
    if logfile == "-":
        if not nodaemon:
            raise SystemExit("Daemons cannot log to stdout, exiting!")
        return LogStream(stream=sys.stdout, journal=isJournalStream(sys.stdout))
    if nodaemon and not logfile:
        return LogStream(stream=sys.stdout, journal=isJournalStream(sys.stdout))
    return LogStream(path=os.path.abspath(logfile or "twistd.log"))


def observerFor(logFormat, stream, reactor=None):
    """
    The observer writing events to C{stream} in C{logFormat} (C{"text"} or
    C{"json"}), each line prefixed with its priority where the stream is
    systemd's journal (L{withPriorities}).

    @param reactor: twistd's reactor, whose events are written on a thread
        of their own (L{QueuedLogObserver}); C{None} (no reactor, a test's
        stream): each on the thread that logged it, before the call
        returns.
    """
    formatter = eventAsJSONLine if logFormat == "json" else classicTextLine
    if getattr(stream, "journal", False):
        formatter = withPriorities(formatter)
    if isinstance(stream, LogStream):
        stream.formatEvent = formatter
    if reactor is not None:
        return QueuedLogObserver(stream, formatter, reactor)
    return FileLogObserver(stream, formatter)


@implementer(ILogObserver)
class QueuedLogObserver:
    """
    The observer of twistd's log file or standard output: an event is put
    in a queue, and a thread of the observer's own formats and writes it
    to its L{LogStream}, in order.

    Written where they were logged (the reactor's thread, mostly), lines
    stopped the whole server while the stream took nothing: standard
    output is a pipe or systemd's journal socket, whose reader (journald)
    can be slow or stuck, and a write to it blocks once it is full (seen
    on a real C{twistd -n mailgate} whose standard output nobody read: no
    reply after 11 POP3 sessions, not even to SIGTERM).  At most
    L{maxPending} events wait; past that, they are dropped and counted
    (L{LogStream.linesDropped}, in C{mailgate_log_lines_lost_total}), and
    the count is said in a line of its own (C{log.lines_lost}) before the
    next event that finds room again.  Formatting happens on the writing
    thread too: the one that logged puts the event in the queue, no more.

    Before the reactor runs and once it has stopped, an event is written
    before the call returns (for L{exitWait} seconds at most): twistd's
    start-up lines come before a failure to start, and twistd ends a
    process stopped by a signal with the signal again (atexit does not
    run) right after its last lines.  At the process's exit, and before a
    fork (twistd daemonizing), what waits is written too, within
    L{exitWait} and L{forkWait} seconds; the child writes with a thread of
    its own.

    It provides L{ILogObserver}, so twistd calls it as it is: an observer
    that does not is wrapped in Twisted's C{LegacyLogObserverWrapper},
    which adds the legacy keys to every event, on the thread that logged
    (3 to 4 % of the reactor's time in a profile of the benchmark's
    sessions), with a deprecation warning at each start.

    @param stream: the L{LogStream} written to.
    @param formatter: an event to its text (L{observerFor}'s).
    @param reactor: whose C{running} says whether it runs (an argument,
        never reached for: the reactor is twistd's, given by
        L{mailgate.tap}).
    """

    #: events waiting to be written at most (a few kilobytes each at most:
    #: bounded memory with a reader that takes nothing)
    maxPending = 10000
    #: how long an event logged while the reactor does not run, and the
    #: process's exit, wait for what is queued to be written (seconds)
    exitWait = 2.0
    #: how long a fork waits for it (seconds)
    forkWait = 1.0
    #: how long the writing thread rests after a batch while the reactor
    #: runs (seconds): a line logged meanwhile waits that long at most.
    #: Long enough for one client's sessions (a millisecond or two each)
    #: to queue their lines without waking the thread: resting 1 ms, it
    #: was woken about once a session, which still cost a POP3 stat
    #: session 7 to 10 % more server CPU than writing where logged (a real
    #: twistd, one client, interleaved); resting 20 ms, the same as that.
    batchWait = 0.02

    def __init__(self, stream, formatter, reactor):
        self.stream = stream
        self._format = formatter
        self._reactor = reactor
        self._queue = SimpleQueue()
        self._thread = None
        # Events dropped since the line that told the last ones.
        self._dropped = 0
        self._droppedLock = threading.Lock()
        # An event logged while the reactor did not run found the stream
        # taking nothing: later ones do not wait for it again until it
        # took what waited.
        self._stuck = False
        _queuedObservers.add(self)

    def __call__(self, event):
        # Called for every line (two or more a session): the thread that
        # logged does no more than this.
        queue = self._queue
        if queue.qsize() >= self.maxPending:
            with self._droppedLock:
                self._dropped += 1
                self.stream.linesDropped += 1
            return
        if self._dropped:
            self._tellDropped()
        queue.put(event)
        if self._thread is None:
            self._start()
        if not self._reactor.running and not self._stuck and threading.current_thread() is not self._thread:
            self._stuck = not self.flush(self.exitWait)

    def _tellDropped(self):
        """
        Queue the line saying how many events were dropped (before the
        event that found room again), in the log's format.
        """
        with self._droppedLock:
            count, self._dropped = self._dropped, 0
        if not count:
            return
        taker = "its reader" if self.stream.path is None else "the file"
        why = f"{taker} took no lines while {self.maxPending} waited"
        text = f"{count} log {'line' if count == 1 else 'lines'} lost, not written to {self.stream.where}: {why}"
        self._queue.put({
            "log_format": "{line}", "line": text, "log_level": LogLevel.warn, "log_namespace": __name__,
            "log_time": _now(), "event": "log.lines_lost", "lost": count, "error": why,
        })

    def _start(self):
        with _startingWriter[0]:
            if self._thread is None:
                thread = threading.Thread(target=self._write, args=(self._queue,), name="log", daemon=True)
                thread.start()
                self._thread = thread

    def _write(self, queue):
        """
        The writing thread: each event formatted and written in order; a
        flush's C{threading.Event} set once what came before it was.

        Woken by the first event of a batch, it writes every event queued
        by then, in one system call, and then rests for L{batchWait} while
        the reactor runs.  Woken for each event and writing each line
        apart, it cost the reactor's thread more than writing there had:
        the thread that logged gave up the GIL at each system call, its
        own and the writer's, and waited for it back while the line was
        formatted (3 text lines and 3 replies, measured apart: 18 us with
        the lines written where logged, 28 us woken for each, 16 us in
        batches; JSON 48, 90 and 50 us).  A line logged while the server
        is idle is written at once.
        """
        stream, format = self.stream, self._format
        while True:
            item = queue.get()
            texts = []
            while True:
                if item.__class__ is dict:
                    try:
                        text = format(item)
                    except Exception:
                        # A value that changed while it was formatted:
                        # that line lost, told with the next one, never
                        # the thread (the only writer).
                        stream.notWritten("an event that could not be formatted")
                    else:
                        if text:
                            texts.append(text)
                else:
                    self._writeOut(texts)
                    texts = []
                    if item is _STOP:
                        return
                    self._stuck = False
                    item.set()
                try:
                    item = queue.get_nowait()
                except Empty:
                    break
            self._writeOut(texts)
            if self._reactor.running:
                _sleep(self.batchWait)

    def _writeOut(self, texts):
        try:
            if texts:
                self.stream.writeLines(texts)
            self.stream.flush()
        except Exception:
            # A stream that raised (a test's): its lines lost, not the
            # thread.
            for _ in texts:
                self.stream.notWritten("a write that raised")

    def flush(self, timeout):
        """
        Wait until every event logged has been written, or for C{timeout}
        seconds at most (a stream that takes nothing).

        @return: whether every event was written.
        """
        if self._dropped:
            self._tellDropped()
        written = threading.Event()
        self._queue.put(written)
        if self._thread is None:
            self._start()
        return written.wait(timeout)

    def stop(self, timeout):
        """
        Write what waits (for C{timeout} seconds at most) and end the
        writing thread; later events are queued and never written.

        @return: whether every event was written.
        """
        written = self.flush(timeout)
        self._queue.put(_STOP)
        _queuedObservers.discard(self)
        return written

    def _beforeFork(self):
        if self._thread is not None:
            self.flush(self.forkWait)

    def _afterForkInChild(self):
        """
        The parent's writing thread does not go on in the child: what it
        left (a stream that took nothing as it forked) is the child's
        thread's to write.
        """
        left, self._queue = self._queue, SimpleQueue()
        while True:
            try:
                self._queue.put(left.get_nowait())
            except Empty:
                break
        self._droppedLock = threading.Lock()
        self._thread = None
        self.stream.afterFork()


#: what ends a L{QueuedLogObserver}'s writing thread
_STOP = object()

#: the L{QueuedLogObserver}s of this process, flushed at its exit and
#: before a fork
_queuedObservers = weakref.WeakSet()


def _flushQueuedObservers():
    for observer in list(_queuedObservers):
        if observer._thread is not None:
            observer.flush(observer.exitWait)


def _beforeFork():
    for observer in list(_queuedObservers):
        observer._beforeFork()


def _afterForkInChild():
    for observer in list(_queuedObservers):
        observer._afterForkInChild()


atexit.register(_flushQueuedObservers)
os.register_at_fork(before=_beforeFork, after_in_child=_afterForkInChild)


class _SecondStamps:
    """
    Twisted's text log time stamps (RFC 3339, to the second, local time),
    made once per second rather than once per line.
    """

    def __init__(self):
        self._second = None
        self._stamp = "-"

    def __call__(self, when):
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._stamp = formatTime(second)
            self._second = second
        return self._stamp


def classicTextLine(event, _stamps=_SecondStamps()):
    """
    An event as the line Twisted's text log observer writes
    (C{"{time} [{system}] {text}"}), made faster for mailgate's own
    events, which carry their text already formatted (a session logs two
    or more per connection: formatting them Twisted's way cost a tenth of
    a short POP3 session).

    A connection's events name their session in the brackets
    (C{"[mailgate.pop3#info session=3f9a2c71b04e.17]"}), as Dovecot's
    lines carry C{session=<...>}: an administrator follows one connection
    through a busy log, or the logs of several nodes, with one C{grep}
    (the JSON format has it as its C{session} key).
    """
    line = event.get("line")
    session = event.get("session")
    if event.get("log_format") != "{line}" or not isinstance(line, str) or "log_failure" in event:
        if isinstance(session, str):
            event = dict(event, log_system=f"{_system(event)} session={session}")
        return formatEventAsClassicLogText(event, formatTime=_stamps)
    system = _system(event)
    if isinstance(session, str):
        system = f"{system} session={session}"
    text = f"{_stamps(event.get('log_time'))} [{system}] {line}"
    return text.replace("\n", "\n\t") + "\n"


def _system(event):
    """
    What Twisted's text lines show in brackets: the event's C{log_system},
    or its namespace and level.
    """
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
    return system


def _noStamp(when):
    return ""


#: what twistd's --prefix is when not given: not a name for mailgate's lines
_TWISTD_PREFIX = "twisted"


@implementer(ILogObserver)
class SyslogObserver:
    """
    twistd's C{--syslog}, as a mail server logs: to the mail facility
    (C{LOG_MAIL}, which a syslog daemon writes to /var/log/mail.log, with
    Dovecot's and Postfix's lines), each line with its event's priority
    (L{PRIORITIES}), under the name C{mailgate} and the process id.

    twistd's own observer (C{twisted.python.syslog.SyslogObserver}) logs
    to C{LOG_USER}, as C{info} every event but errors, warnings included,
    and errors as C{alert} (the priority of "act at once", which pages an
    administrator where C{err} does not), under twistd's C{--prefix},
    C{twisted} unless given.

    A line is the text format's without its time stamp (syslog adds its
    own): C{[system session=...] message}.  A text of several lines (a
    traceback) is sent line by line, each with the event's priority, its
    lines after the first beginning with a tab, as twistd's observer does:
    a syslog message is one line.

    syslog(3) is called on a thread of the observer's own, never where
    the event was logged (the reactor's thread, mostly): it blocks while
    the syslog daemon takes nothing (a stuck rsyslog or journald, whose
    /dev/log queue holds a few datagrams), which stopped the whole server,
    every session and new connection, until the daemon read again (seen
    on a real twistd --syslog whose /dev/log nobody read: no reply after 7
    POP3 sessions; twistd's own observer did the same).  At most
    L{maxPending} events wait for it; past that, events are counted and
    not sent, and the count is said in a line of its own once there is
    room again.

    @param ident: the name the lines carry; C{None}, or twistd's default
        C{--prefix} (C{twisted}), is C{mailgate}.
    @param syslog: the module whose C{openlog} and C{syslog} are called,
        Python's C{syslog} unless given (tests give their own, and so
        never write to the host's /dev/log).
    @param running: a callable telling whether the reactor runs (twistd's,
        given by L{mailgate.tap}: the reactor is an argument here, never
        reached for); C{None}: as if it always ran (an embedder's
        application, whose reactor runs for the process's life).
    """

    #: events waiting to be sent at most (their lines, a few kilobytes
    #: each at most: bounded memory with a syslog daemon that takes nothing)
    maxPending = 10000
    #: events not sent since the start, the queue full: what
    #: C{mailgate_log_lines_lost_total} exports (L{mailgate.tap} hands
    #: the observer to the metrics), for an alert the lost lines cannot
    #: raise
    linesLost = 0
    #: no file to reopen (C{mailgate_log_last_reopen_successful} 1)
    reopenFailed = False
    #: how long the process's exit waits for lines not yet sent (seconds)
    exitWait = 2.0
    #: how long a fork waits for them (seconds)
    forkWait = 1.0
    #: how long the sending thread rests after sending what waited while
    #: the reactor runs (seconds): a line logged meanwhile waits that long
    #: at most
    batchWait = 0.02

    def __init__(self, ident=None, syslog=None, facility=None, running=None):
        if syslog is None:
            import syslog
        self._syslog = syslog
        self._running = (lambda: True) if running is None else running
        self.ident = ident if ident and ident != _TWISTD_PREFIX else "mailgate"
        self.facility = syslog.LOG_MAIL if facility is None else facility
        syslog.openlog(self.ident, syslog.LOG_PID, self.facility)
        # Events' lines waiting for the sending thread (L{_send}).
        self._pending = collections.deque()
        self._lost = 0
        self._pid = None
        # A flush outside the reactor's run found the daemon taking nothing.
        self._stuck = False
        atexit.register(self.flush, self.exitWait)
        # twistd daemonizes by forking: what is still to be sent is sent
        # first, or the child's copy of the queue would send it again.
        os.register_at_fork(before=lambda: self.flush(self.forkWait))

    def __call__(self, event):
        text = classicTextLine(event, _noStamp)
        if not text:
            return
        # The format's time stamp was empty: the line began with its space.
        text = text[1:] if text.startswith(" ") else text
        # syslog(3) takes a C string: no NUL, and text encodable as UTF-8.
        text = text.replace("\0", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")
        priority = priorityOf(event) | self.facility
        lines = [(priority, line) for line in text.rstrip("\n").split("\n")]
        wake = self._writer()
        with self._lock:
            if len(self._pending) >= self.maxPending:
                self._lost += 1
                self.linesLost += 1
                return
            if self._lost:
                self._pending.append([(PRIORITIES[LogLevel.warn] | self.facility, self._lostLine())])
                self._lost = 0
            self._pending.append(lines)
        wake.set()
        if not self._stuck and not self._running():
            # Starting, or stopped: twistd ends a process stopped by a
            # signal with the signal again (atexit does not run), right
            # after its last lines ("Server Shut Down."), which would be
            # lost with the thread.  No session waits meanwhile.
            self._stuck = not self.flush(self.exitWait)

    def _lostLine(self):
        return (
            f"[{__name__}#warn] {self._lost} log events not sent to syslog: the syslog daemon took no lines "
            f"while {self.maxPending} waited (is it stuck?)"
        )

    def _writer(self):
        """
        The event that wakes this process's sending thread, which is
        started in each process anew: twistd daemonizes (forks) after the
        observer was made and its first lines were logged, and a thread
        does not go on in the child.  Lines the parent left are sent by
        the child's.
        """
        pid = os.getpid()
        if self._pid != pid:
            with _startingWriter[0]:
                if self._pid != pid:
                    self._lock = threading.Lock()
                    self._wake = threading.Event()
                    threading.Thread(target=self._send, args=(self._wake,), name="syslog", daemon=True).start()
                    self._pid = pid
        return self._wake

    def _send(self, wake):
        """
        The sending thread: each event's lines to syslog(3), in order.  An
        event leaves L{_pending} once its lines are sent, so that an empty
        queue means all were (L{flush}).
        """
        while True:
            wake.wait()
            wake.clear()
            while self._pending:
                for priority, line in self._pending[0]:
                    try:
                        self._syslog.syslog(priority, line)
                    except Exception:
                        # One line syslog(3) refused, not every later
                        # one with the thread: it is the only sender.
                        pass
                self._pending.popleft()
            if self._running():
                # Lines logged meanwhile set the event without waking the
                # thread: one wake-up for the lines of many sessions, not
                # one a line (L{QueuedLogObserver.batchWait}).
                _sleep(self.batchWait)

    def flush(self, timeout):
        """
        Wait until every line logged has been sent to syslog, or for
        C{timeout} seconds at most (a syslog daemon that takes nothing):
        at the process's exit, so that its last lines are not lost with
        the sending thread.

        @return: whether every line was sent.
        """
        deadline = _monotonic() + timeout
        if self._pending:
            self._writer().set()
        while self._pending:
            left = deadline - _monotonic()
            if left <= 0:
                return False
            _sleep(min(left, 0.01))
        return True


#: held while a L{SyslogObserver} starts its sending thread; made anew in
#: a forked child, where a thread of the parent could have held it
_startingWriter = [threading.Lock()]


def _newStartingLock():
    _startingWriter[0] = threading.Lock()


os.register_at_fork(after_in_child=_newStartingLock)


def jsonFileLogObserver(stream):
    """
    An observer writing one JSON object per event and line to C{stream}.
    """
    return FileLogObserver(stream, eventAsJSONLine)


def eventAsJSONLine(event):
    """
    An event as one line of JSON (see L{eventAsRecord}).
    """
    return json.dumps(eventAsRecord(event), ensure_ascii=False, separators=(",", ":")) + "\n"


def eventAsRecord(event):
    """
    The JSON object of one log event: C{time}, C{level}, C{event}, the
    connection's context keys, the event's own fields, C{text}, and
    C{traceback} for a failure.
    """
    record = {
        "time": _rfc3339(event.get("log_time")),
        "level": getattr(event.get("log_level"), "name", "info"),
    }
    name = event.get("event")
    if not isinstance(name, str) or not name:
        name = event.get("log_namespace") or "log"
    record["event"] = name
    for key in CONTEXT_KEYS:
        if key in event and event[key] is not None:
            record[key] = _jsonSafe(event[key])
    legacy = "log_legacy" in event or "isError" in event
    # An event made by emitLine (or a session's logFailure) carries its
    # text as "line": it is the record's "text", not a field of its own.
    # Such an event is a session's, or a reload's, whose fields are
    # bounded where they are made (an address at 256 characters, a
    # delivery's recipients at --max-recipients, the settings a reload
    # applied by the settings there are): they are written whole, not cut at _MAX_ITEMS
    # and _MAX_TEXT as other code's may be (a delivery to 100 users had
    # the unique ids of its first 50 in its record).
    preformatted = event.get("log_format") == "{line}"
    for key, value in event.items():
        if key in record or key == "event" or key.startswith("log_") or _SECRET.search(key):
            continue
        if preformatted and key == "line":
            continue
        if legacy and key in _LEGACY_KEYS:
            continue
        if key == "system" and value == "-":
            continue
        record[key] = _jsonSafe(value, whole=preformatted)
    text = formatEvent(event)
    record["text"] = text
    failure = event.get("log_failure")
    if failure is None and legacy:
        failure = event.get("failure")
    if failure is not None and hasattr(failure, "getTraceback"):
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = _shortText(repr(failure))
    return record


def _rfc3339(timestamp):
    if not isinstance(timestamp, (int, float)):
        timestamp = datetime.datetime.now(datetime.timezone.utc).timestamp()
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _shortText(text, whole=False):
    return text if whole or len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def _jsonSafe(value, depth=0, whole=False):
    """
    C{value} as JSON can hold it: numbers, text, lists and objects as they
    are (bounded, unless C{whole}: a session's own fields), anything else
    as its text.
    """
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _shortText(value, whole)
    if isinstance(value, bytes):
        return _shortText(value.decode("utf-8", "backslashreplace"), whole)
    if depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        return [_jsonSafe(v, depth + 1, whole) for v in (items if whole else items[:_MAX_ITEMS])]
    if depth < 3 and isinstance(value, dict):
        items = list(value.items())
        return {
            str(k): _jsonSafe(v, depth + 1, whole)
            for k, v in (items if whole else items[:_MAX_ITEMS])
            if not _SECRET.search(str(k))
        }
    if isinstance(value, BaseException):
        return _shortText(f"{type(value).__name__}: {value}")
    try:
        return _shortText(str(value))
    except Exception:
        return f"<unprintable {type(value).__name__}>"
