# -*- test-case-name: tests.test_systemd -*-
"""
Telling systemd how mailgate is doing (C{Type=notify} units), without a
library: the protocol is one datagram of C{KEY=VALUE} lines to the Unix
socket named by C{$NOTIFY_SOCKET} (a path, or C{@name} in the abstract
namespace).  See sd_notify(3).

  - C{READY=1} once every listener is bound and the database has answered;
  - C{STATUS=...} with the number of open sessions, when it changes,
    and after a reload whether it failed and which changed settings
    wait for a restart;
  - C{RELOADING=1} (with C{MONOTONIC_USEC=}) when a SIGHUP's reload
    begins and C{READY=1} when it is over: C{systemctl status} shows the
    reload, and a unit of C{Type=notify-reload} (systemd 253 and later)
    has C{systemctl reload} wait for it;
  - C{STOPPING=1} first thing when shutdown begins, with
    C{EXTEND_TIMEOUT_USEC=} the time the stop may take (the sessions'
    shutdown grace and a margin), so that a grace longer than the unit's
    C{TimeoutStopSec} is honoured rather than cut short by its SIGKILL;
  - C{WATCHDOG=1} every half of C{$WATCHDOG_USEC} while the reactor runs
    (a reactor that hangs stops the pings, and systemd restarts the
    service);
  - while a start upgrades the database schema (or waits for another
    node's upgrade), C{STATUS=} says so and C{EXTEND_TIMEOUT_USEC=} every
    few seconds extends C{TimeoutStartSec} (L{StartExtension}).

Socket activation needs nothing here: Twisted's
C{systemd:domain=INET:index=0} (or C{name=...}) endpoints adopt the sockets
systemd passes (C{contrib/systemd/mailgate.socket}).
"""

import os
import socket
import threading
import time

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailgate.errors import errorKind

#: seconds between two checks of the session count for C{STATUS=}
STATUS_INTERVAL = 1.0
#: seconds between two attempts to send what systemd's socket had no room for
RETRY_EVERY = 0.1
#: the lines that replace the one before (sd_notify(3)): of these, only the
#: latest waiting to be sent is worth sending
REPLACED = frozenset({"STATUS", "EXTEND_TIMEOUT_USEC", "WATCHDOG_USEC"})
#: seconds between two attempts to reach the database before C{READY=1}
READY_RETRY = 1.0
#: the largest EXTEND_TIMEOUT_USEC= systemd reads: its infinity (USEC_INFINITY)
USEC_INFINITY = (1 << 64) - 1
#: seconds between two extensions of the start timeout while the schema is
#: upgraded, and how far each extends it: three times that, so that one
#: sent late is still in time
EXTEND_EVERY = 10.0
EXTEND_BY = 3 * EXTEND_EVERY


class Notifier:
    """
    Sends notifications to systemd's socket.

    @ivar address: the socket address (a path, or C{"\\0name"}).
    """

    log = Logger()

    def __init__(self, address):
        self.address = address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)
        self._failed = False
        #: the clock to send again on (L{retryOn}), or C{None}
        self._clock = None
        #: the datagrams systemd's socket had no room for, oldest first
        self._backlog = []
        self._retry = None

    @classmethod
    def fromEnvironment(cls, environ=None):
        """
        The notifier C{$NOTIFY_SOCKET} names, or C{None} when it is unset
        (mailgate is not run by systemd as a notify service).
        """
        environ = os.environ if environ is None else environ
        name = environ.get("NOTIFY_SOCKET")
        if not name:
            return None
        if name.startswith("@"):
            name = "\0" + name[1:]
        return cls(name)

    def retryOn(self, clock):
        """
        From now on, keep what systemd's socket has no room for and send it
        again on C{clock} (the reactor's thread alone then calls
        L{notify}).  The socket is full while PID 1 is busy (a
        daemon-reload, a boot) and every service's notifications queue up
        (C{net.unix.max_dgram_qlen} of them, 10 in a container's network
        namespace): sd_notify(3) waits there, and the reactor must not, so
        each state change waits here, in order, with the latest status
        (L{_keep}).  Dropped, a C{READY=1} left the
        unit starting until C{TimeoutStartSec} killed a server that served,
        a C{STOPPING=1} let C{TimeoutStopSec} cut the sessions' grace short,
        and a C{READY=1} after C{RELOADING=1} left C{systemctl reload}
        waiting.
        """
        self._clock = clock

    def notify(self, *lines):
        """
        Send C{lines} (C{"READY=1"}, C{"STATUS=..."}) in one datagram.

        @return: whether it was sent (not: kept to be sent again, see
            L{retryOn}, or lost).  A failure is logged once, never raised:
            systemd being away must not take mailgate down.
        """
        if self._backlog:
            self._keep(list(lines))
            return False
        return self._send(list(lines))

    def _send(self, lines):
        try:
            self._socket.sendto("\n".join(lines).encode("utf-8"), self.address)
        except BlockingIOError as e:
            if self._clock is None:
                self._warn(e)
            else:
                self._keep(lines)
            return False
        except OSError as e:
            self._warn(e)
            return False
        return True

    def _keep(self, lines):
        """
        Keep C{lines} to be sent after what waits already, never losing a
        state change however long systemd reads nothing (a cap of 64 kept
        lost the READY=1 or STOPPING=1 behind a minute of STATUS=): a line
        that replaces the one before (L{REPLACED}, C{WATCHDOG=1}) takes
        that one's place out of what waits, every other line (C{READY=1},
        C{STOPPING=1}, C{MAINPID=}, C{ERRNO=}...) waits in order, and a
        reload's C{RELOADING=1} takes out the whole reloads waiting before
        it (L{_endReloads}).  What waits is so at most one datagram
        per distinct state change, and one line of each kind that
        replaces: a few datagrams, not one per notification.
        """
        replaced = {_replaces(line) for line in lines} - {None}
        backlog = []
        for datagram in self._backlog:
            datagram = [line for line in datagram if _replaces(line) not in replaced]
            if datagram:
                backlog.append(datagram)
        lines = self._endReloads(backlog, lines)
        if backlog and not _changes(lines) and not _changes(backlog[-1]):
            # A status or a ping after another: one datagram.
            backlog[-1] = backlog[-1] + lines
        else:
            backlog.append(lines)
        self._backlog = backlog
        if self._retry is None:
            self._retry = self._clock.callLater(RETRY_EVERY, self._sendKept)

    @staticmethod
    def _endReloads(backlog, lines):
        """
        Reloads while systemd reads nothing come as RELOADING=1, READY=1,
        RELOADING=1, READY=1...: when C{lines} begin another reload
        (C{RELOADING=1}), the reloads waiting whole (a C{RELOADING=1} and
        the C{READY=1} that ended it) since the last other state change are
        taken out of C{backlog}, their waiting statuses going with C{lines}.
        The newest reload's C{RELOADING=1} and C{READY=1} are always sent:
        under Type=notify-reload systemd ends the reload it asked for (by a
        SIGHUP) only at a C{READY=1} after a C{RELOADING=1} stamped no
        earlier than its signal, and the newest stamp is the latest.  The
        C{READY=1} that ended the start is never taken out.

        @return: C{lines}, with the replacing lines of the reloads taken out.
        """
        if "RELOADING=1" not in lines:
            return lines
        cut = i = len(backlog)
        expected = ["READY=1"]
        while i > 0:
            changes = _changes(backlog[i - 1])
            if not changes:
                i -= 1
            elif changes == expected == ["READY=1"]:
                expected = ["RELOADING=1", "MONOTONIC_USEC"]
                i -= 1
            elif changes == expected:
                expected = ["READY=1"]
                i -= 1
                cut = i
            else:
                break
        carried = [line for datagram in backlog[cut:] for line in datagram if _replaces(line)]
        del backlog[cut:]
        return lines + carried

    def _sendKept(self):
        self._retry = None
        backlog, self._backlog = self._backlog, []
        for i, lines in enumerate(backlog):
            if not self._send(lines) and self._backlog:
                # No room yet: that one kept again, the rest after it.
                self._backlog.extend(backlog[i + 1:])
                return

    @property
    def waiting(self):
        """
        Whether notifications systemd's socket had no room for wait to be
        sent again (L{retryOn}).
        """
        return bool(self._backlog)

    def _warn(self, error):
        if not self._failed:
            self._failed = True
            self.log.warn(
                "cannot notify systemd at {address}: {error}",
                address=self.address.replace("\0", "@"),
                error=error,
                event="systemd.notify_failed",
            )

    def close(self):
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._socket.close()


def _replaces(line):
    """
    The kind of notification C{line} replaces the one before of
    (L{REPLACED}, C{WATCHDOG=1}), or C{None}: a state change.
    """
    key = line.split("=", 1)[0]
    if key in REPLACED or line == "WATCHDOG=1":
        return key
    return None


def _changes(lines):
    """
    The state changes among C{lines}, to compare with another datagram's:
    a C{MONOTONIC_USEC=} stamp as one, whatever its time.
    """
    return [
        "MONOTONIC_USEC" if line.startswith("MONOTONIC_USEC=") else line for line in lines if _replaces(line) is None
    ]


def watchdogInterval(environ=None, pid=None):
    """
    Seconds between two C{WATCHDOG=1}: half of C{$WATCHDOG_USEC}, or
    C{None} when systemd watches no process or another one
    (C{$WATCHDOG_PID}).
    """
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watched = environ.get("WATCHDOG_PID")
    if watched and watched != str(pid):
        return None
    return usec / 1e6 / 2


def describeSessions(counts):
    """
    The C{STATUS=} text for open sessions by protocol.
    """
    total = sum(counts.values())
    detail = ", ".join(f"{protocol} {n}" for protocol, n in sorted(counts.items()))
    return f"{total} session{'' if total == 1 else 's'} ({detail})"


class SystemdService(Service):
    """
    The notifications of one mailgate service to systemd.

    @param root: the L{mailgate.service.MailgateService}: its
        C{whenListening}, C{databaseAnswers}, C{onStopping}, C{onReload}
        and C{metrics}.
    @param notifier: a L{Notifier}.
    @param reactor: for timers.
    @param watchdog: seconds between C{WATCHDOG=1}, or C{None}.
    """

    log = Logger()
    name = "systemd"

    def __init__(self, root, notifier, reactor, watchdog=None):
        self._root = root
        self._notifier = notifier
        self._reactor = reactor
        notifier.retryOn(reactor)
        self._watchdogInterval = watchdog
        self._loops = []
        self._lastStatus = None
        self.ready = False
        self.stopping = False
        root.onStopping(self.shutdownBegins)
        root.onReload(self.reloadBegins, self.reloadEnds)
        self._reloading = False

    def startService(self):
        Service.startService(self)
        self._notifier.notify("STATUS=starting")
        d = self._root.whenListening()
        d.addCallback(lambda _: self._waitForDatabase())
        d.addCallback(self._ready)
        d.addErrback(lambda failure: self.log.failure("not telling systemd READY=1", failure, event="systemd.failed"))
        if self._watchdogInterval:
            self._every(self._watchdogInterval, lambda: self._notifier.notify("WATCHDOG=1"))

    def _every(self, seconds, function):
        loop = task.LoopingCall(function)
        loop.clock = self._reactor
        loop.start(seconds, now=True).addErrback(
            lambda failure: self.log.failure("systemd notification loop failed", failure, event="systemd.failed")
        )
        self._loops.append(loop)

    @defer.inlineCallbacks
    def _waitForDatabase(self):
        while self.running and not self.stopping:
            try:
                yield self._root.databaseAnswers()
                return True
            except Exception as e:
                self.log.warn(
                    "database not answering yet, not ready: {error}", error=e, event="systemd.waiting"
                )
                # The kind of error only: any local user may read STATUS=
                # (systemctl status), and a database error's text names
                # hosts, roles and databases.  The log has all of it.
                self._notifier.notify(f"STATUS=waiting for the database ({errorKind(e)}; the log says why)")
                yield task.deferLater(self._reactor, READY_RETRY, lambda: None)
        return False

    def _ready(self, answered):
        if not answered:
            return
        self.ready = True
        self._lastStatus = self._status()
        if self._notifier.notify("READY=1", f"STATUS={self._lastStatus}"):
            self.log.info("told systemd READY=1", event="systemd.ready")
        elif getattr(self._notifier, "waiting", False):
            self.log.info(
                "READY=1 waits for room in systemd's notification socket (PID 1 busy): told once there is",
                event="systemd.ready",
            )
        else:
            # Lost (the socket gone, refused): "told systemd READY=1" was
            # logged all the same, after the notifier's warning.
            self.log.warn(
                "systemd was not told READY=1: its notification socket {address} could not be written to",
                address=str(getattr(self._notifier, "address", "")).replace("\0", "@"),
                event="systemd.notify_failed",
            )
        self._every(STATUS_INTERVAL, self._statusIfChanged)

    def _status(self):
        metrics = getattr(self._root, "metrics", None)
        counts = metrics.openConnections() if metrics is not None else {}
        status = ("stopping: " if self.stopping else "serving: ") + describeSessions(counts)
        if self.stopping:
            return status
        # What systemctl status shows after a reload, until the next one:
        # a failed reload said only "serving" there (systemctl reload had
        # succeeded once config --check passed, or at once under
        # Type=notify-reload), and the settings the file changes that wait
        # for a restart were in one log line of many.  Setting names only:
        # any local user may read STATUS=.
        if getattr(self._root, "lastReloadFailed", False):
            status += "; the last reload failed, what was in service before it still is (the log says why)"
        waiting = getattr(self._root, "restartNeeded", ())
        if waiting:
            status += "; waiting for a restart: " + ", ".join(waiting)
        return status

    def _statusIfChanged(self):
        status = self._status()
        if status != self._lastStatus:
            self._lastStatus = status
            self._notifier.notify(f"STATUS={status}")

    def reloadBegins(self):
        """
        A reload begins: C{RELOADING=1}, stamped with the monotonic clock
        as sd_notify(3) asks, so systemd tells this reload from an earlier
        one.  Not before C{READY=1} (the service is still starting) nor
        while stopping.
        """
        if not self.ready or self.stopping:
            return
        self._reloading = True
        stamp = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notifier.notify("RELOADING=1", f"MONOTONIC_USEC={stamp}", "STATUS=reloading")

    def reloadEnds(self):
        """
        The reload is over, whatever it found (what failed is logged, and
        the configuration in service stays): C{READY=1} again.
        """
        if not self._reloading:
            return
        self._reloading = False
        if self.stopping:
            return
        self._lastStatus = self._status()
        self._notifier.notify("READY=1", f"STATUS={self._lastStatus}")

    def shutdownBegins(self):
        """
        Shutdown begins: C{STOPPING=1}, before anything closes.
        """
        if self.stopping:
            return
        self.stopping = True
        self._lastStatus = self._status()
        lines = ["STOPPING=1", f"STATUS={self._lastStatus}"]
        limit = getattr(self._root, "stopTimeLimit", None)
        if limit is not None:
            # Extends TimeoutStopSec only where it is shorter (sd_notify(3)).
            # At most systemd's infinity, 2**64 - 1: a grace of 1e13 seconds
            # or more (--shutdown-grace takes any number) was past what its
            # parser reads, the line was ignored, and TimeoutStopSec's
            # SIGKILL cut the sessions' grace short after all.
            lines.append(f"EXTEND_TIMEOUT_USEC={min(int(limit() * 1_000_000), USEC_INFINITY)}")
        self._notifier.notify(*lines)

    def stopService(self):
        Service.stopService(self)
        self.shutdownBegins()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []


class StartExtension:
    """
    Keeps systemd from killing a start that upgrades the database schema,
    for as long as it takes: the upgrade runs before the service tells
    systemd it is ready, and a migration of a large database (version 4
    copies an SQLite database's messages, 3 counts every maildrop) outlasts
    C{TimeoutStartSec} (90 s by default); killed, it rolled back, and
    C{Restart=on-failure} began it again, to be killed again, at every
    restart, the mail server down for good.  While in this context, a
    thread sends C{EXTEND_TIMEOUT_USEC=} (sd_notify(3): systemd 236 and
    later) every L{EXTEND_EVERY} seconds, with a C{STATUS=} saying why.
    A start that hangs otherwise is still ended by C{TimeoutStartSec}.

    @param notifier: the L{Notifier}.
    @param fromVersion: the schema version the upgrade starts from.
    @param toVersion: the version it brings the database to.
    """

    def __init__(self, notifier, fromVersion, toVersion):
        self._notifier = notifier
        self._status = f"STATUS=upgrading the database schema from version {fromVersion} to {toVersion}"
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._extend, name="mailgate-start-extension", daemon=True)

    def _extend(self):
        while True:
            self._notifier.notify(f"EXTEND_TIMEOUT_USEC={int(EXTEND_BY * 1_000_000)}", self._status)
            if self._done.wait(EXTEND_EVERY):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(EXTEND_EVERY)
        return False
