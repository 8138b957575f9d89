# -*- test-case-name: tests.test_tap -*-
"""
Building mailgate's service hierarchy: the one place that wires storage,
authentication and protocols together.

L{makeService} turns a L{MailgateConfig} into a L{MultiService} that an
embedder can attach to an existing application with C{setServiceParent},
and that C{twistd mailgate} runs on its own.
"""

import errno
import os
import signal
import sys
import traceback

from twisted.application.internet import StreamServerEndpointService
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from mailgate.affinity import AffinityService, CPUAffinity, parseCPUs
from mailgate.auth.cache import VerifiedCredentialCache
from mailgate.auth.checkers import threadRunner
from mailgate.auth.oauth import TokenValidator
from mailgate.auth.realm import makePortal
from mailgate.auth.sasl import SASLServer
from mailgate.config import MailgateConfig, checkConfig, checkEndpoint  # noqa: F401 (MailgateConfig re-exported)
from mailgate.config import networksOf, openSockets, splitCertificatePair
from mailgate.errors import ConfigurationError, ShuttingDown, WritesFailing
from mailgate.hostname import machineName
from mailgate.interfaces import ILifecycleStore
from mailgate.listenercheck import checkListenersForTheRestart
from mailgate.logs import writeStartFailure
from mailgate.memory import MemoryTrimmer
from mailgate.message import checkSpoolDirectory
from mailgate.metrics import Metrics, NotServed
from mailgate.policy.descriptors import fittedConnectionLimit, openFileLimit, quotaStatusConnections
from mailgate.policy.service import PolicyService
from mailgate.pop3 import POP3Factory
from mailgate.pop3.factory import APOPAdvertiser
from mailgate.session import SessionTracker, TraceSelection
from mailgate.session.accepting import watchAcceptErrors
from mailgate.session.endpoints import serverEndpoint
from mailgate.session.ids import describeAddress
from mailgate.session.tlslayer import TLSLayerFactory
from mailgate.signals import processSignals
from mailgate.smtp import LMTPFactory, LocalDelivery, SMTPFactory
from mailgate.store import checkDatabaseURL, openStore, schemaUpgradeNotice
from mailgate.store.database import THREADS_STOP_TIMEOUT
from mailgate.store.housekeeping import RegistryService, RetentionService
from mailgate.store.limits import StoreLimits
from mailgate.store.sqlite import databaseDirectoryWarning, databaseFileWarning
from mailgate.tls import ServerTLS, TicketKeyRotation
from mailgate.twistedcompat import raiseListenErrorsAtOnce, whenListening
from mailgate.plural import noun
from mailgate.reload import OAUTH2_SETTINGS, TLS_SETTINGS, reloadConfiguration, reloadTokenKeys

APOP_REFRESH = 30
#: seconds the database has to answer the health check and readiness probe
HEALTH_TIMEOUT = 1.0
#: the listeners that take mail connections (closed first at shutdown)
MAIL_PROTOCOLS = ("POP3", "POP3S", "SMTP", "LMTP")
#: seconds the services other than the listeners (the retention task, the
#: node's registry, the metrics endpoint) have to stop once the sessions
#: are gone, before the store closes all the same: each may wait for the
#: database, and one that does not answer (a network that drops its
#: packets, a PostgreSQL server that hangs) held the stop for ever
STOP_TIMEOUT = 10.0
#: seconds of a stop beside the sessions' grace (see
#: L{MailgateService.stopTimeLimit}): the services' L{STOP_TIMEOUT}, the
#: store's threads' L{THREADS_STOP_TIMEOUT}, both waited for in full when
#: the database hangs, and 2 for the rest (the listeners, the exit)
STOP_MARGIN = STOP_TIMEOUT + THREADS_STOP_TIMEOUT + 2.0
#: seconds between two checks of the certificates' validity while the
#: server runs (C{tls.expiry}), beside the start's and each reload's
TLS_VALIDITY_CHECK_INTERVAL = 24 * 3600
#: RFC 5321 section 4.5.3.2.7: an SMTP server's timeout should be at least
#: five minutes (smtp-idle-timeout below it is warned of)
SMTP_SERVER_TIMEOUT = 300


#: why a listener could not start that trying again cannot cure: the
#: port, or the directory of a Unix socket, refused to this user (EACCES,
#: EPERM), or on a file system mounted read-only (EROFS: under the systemd
#: unit's ProtectSystem=strict, a socket's directory not in ReadWritePaths=),
#: or a socket's directory that is not there (ENOENT, ENOTDIR: under systemd
#: the unit's RuntimeDirectory= is made before the start, so a directory
#: still missing is one no unit makes, or a mistyped path)
LASTING_LISTEN_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR)


class StartupExit(SystemExit, Exception):
    """
    The exit of a start that failed (L{MailgateService.exitOnStartupError}):
    the process ends with its status, and no traceback, as with any
    C{SystemExit}.  An C{Exception} too, so that twistd, which removes its
    pid file for a start that failed with one, removes it: after a plain
    C{SystemExit} the file stayed, and the next start under the same pid
    (a container's twistd is PID 1 at every restart) was refused for good
    ("Another twistd server is running").
    """


def _listenFailureStatus(error):
    """
    The exit status of a start-up that failed for C{error}: 1, which
    systemd's C{Restart=on-failure} retries (a port still held by the
    process before, an address not yet up at boot), but C{EX_CONFIG} (78)
    when a listener was refused the port or the socket file itself (a port
    below 1024 without C{CAP_NET_BIND_SERVICE}, a Unix socket in a
    directory the user may not write, or in one that does not exist):
    trying again cannot work, and the unit's C{RestartPreventExitStatus=78}
    leaves it failed with its reason.

    The error is the bind's (Twisted's C{CannotListenError}, its
    C{socketError}), or for a Unix socket with its lock file (Twisted's
    default, C{lockfile=1}) the lock's own C{OSError}, made first: the same
    directory exited 78 with C{lockfile=0} and 1 without.
    """
    cause = error.__cause__
    cause = getattr(cause, "socketError", cause)
    if getattr(cause, "errno", None) in LASTING_LISTEN_ERRORS:
        return os.EX_CONFIG
    return 1


def _describeListenError(error):
    """
    Why a listener could not start, in words an administrator can act on.

    A Unix socket's failures came in Twisted's words: its lock file's
    (Twisted's default, C{lockfile=1}) as the bare C{os.symlink} error,
    C{[Errno 2] No such file or directory: '21967' -> b'/run/x/lmtp.lock'}
    (the process id and the lock's path, as bytes), and the bind's as
    C{Couldn't listen on any:b'/run/x/lmtp': [Errno 2] ...}.  They now name
    the file and what was made of it, and a missing directory is said to be
    missing.  Any other error (a TCP port's) is left as Twisted words it.
    """
    if isinstance(error, CannotListenError) and isinstance(error.port, (bytes, str)):
        path = os.fsdecode(error.port)
        cause = error.socketError
        if isinstance(cause, OSError):
            return _pathError("cannot make the socket", path, cause)
        if cause == "Cannot acquire lock":
            return (
                f"its lock file {path}.lock is held by another running process (another mailgate "
                "listening on this socket?)"
            )
        return str(error)
    if isinstance(error, OSError) and error.filename2 is not None:
        path = os.fsdecode(error.filename2)
        if path.endswith(".lock"):
            return _pathError("cannot make the socket's lock file", path, error)
    return str(error)


def _pathError(what, path, error):
    """
    C{what} could not be made at C{path}, for C{error}; where the directory
    is missing (ENOENT), say so, as that is what to make.
    """
    reason = f"{what} {path}: {error.strerror or error}"
    directory = os.path.dirname(path) or "."
    if error.errno == errno.ENOENT:
        reason += f" (the directory {directory} does not exist: make it, or correct the path)"
    elif error.errno == errno.ENOTDIR:
        reason += f" (a part of {directory} is not a directory: correct the path)"
    return reason


class ListeningService(StreamServerEndpointService):
    """
    A listener that says where it listens, and fails start-up (rather than
    logging and carrying on deaf) when it cannot.

    Given a reactor, it also watches its accept loop for a process out of
    file descriptors (L{mailgate.session.accepting}).

    @ivar port: the listening port, once bound.
    @ivar acceptErrors: its L{AcceptErrors}, once bound, or C{None}.
    """

    log = Logger()

    def __init__(self, name, description, endpoint, factory, reactor=None, metrics=None):
        super().__init__(endpoint, factory)
        raiseListenErrorsAtOnce(self)
        self.protocolName = name
        self.description = description
        self.port = None
        self.acceptErrors = None
        self._reactor = reactor
        self._metrics = metrics
        self._waiters = []
        #: why it will not listen (see L{giveUp}), or C{None}
        self._neverReason = None
        #: it has asked its endpoint to listen (bound, binding or refused):
        #: a start that fails must stop it (L{MailgateService}), running
        #: or not
        self.listenAsked = False

    def privilegedStartService(self):
        self.listenAsked = True
        self._neverReason = None
        try:
            super().privilegedStartService()
        except Exception as e:
            error = ConfigurationError(
                f"cannot listen for {self.protocolName} on {self.description}: {_describeListenError(e)}"
            )
            self.giveUp(error)
            raise error from e
        whenListening(self, self._listening)

    def whenListening(self):
        """
        A L{Deferred} that fires with the port once it is bound, or fails
        with the reason it never will be (it cannot bind, or was stopped
        first: see L{giveUp}).
        """
        if self.port is not None:
            return defer.succeed(self.port)
        if self._neverReason is not None:
            return defer.fail(self._neverReason)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def _listening(self, port):
        self.port = port
        address = port.getHost()
        if hasattr(address, "port"):
            # [::1]:110, as peers are written: ::1:110 is an IPv6 address.
            where = describeAddress(address)
        else:
            where = getattr(address, "name", address)
            if isinstance(where, bytes):
                where = where.decode("utf-8", "replace")
        self.log.info(
            "{protocol} listening on {where} ({description})",
            protocol=self.protocolName,
            where=where,
            description=self.description,
            event="listener.started",
        )
        if self._reactor is not None:
            self.acceptErrors = watchAcceptErrors(port, self.protocolName, where, self._reactor, self._metrics)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(port)
        return port

    def giveUp(self, reason):
        """
        Fail the L{whenListening} waiters with C{reason} (an exception)
        when the port will not be bound: a wait for a listener of a start
        that failed, or of a service stopped first, never ended.  A wait
        asked for later fails alike, at once (with the first reason: the
        port refused, rather than the stop that followed), until a new
        start.
        """
        if self._neverReason is None:
            self._neverReason = reason
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(reason)

    def stopService(self):
        self.listenAsked = False
        if self.acceptErrors is not None:
            self.acceptErrors.stop()
        if self.port is None:
            self.giveUp(ShuttingDown(f"{self.protocolName} on {self.description}: stopped before it listened"))
        else:
            # Stopped after it listened: the port is closed now, and a wait
            # asked for from now on fails at once (until a new start)
            # rather than fire with a port that takes no connection.
            self.port = None
            self._neverReason = ShuttingDown(f"{self.protocolName} on {self.description}: stopped")
        return super().stopService()


class StoreService(Service):
    """
    Owns the store: closes its connections when the service stops.
    """

    def __init__(self, store):
        self.store = store

    def stopService(self):
        Service.stopService(self)
        return self.store.close()


class MailgateService(MultiService):
    """
    The root of mailgate's services.

    Stopping (SIGTERM under twistd) goes in this order, each step waiting
    for the one before:
      1. the L{onStopping} callbacks run (systemd hears C{STOPPING=1});
      2. the mail listeners close: new connections are refused at once;
      3. L{drainSessions}: the sessions still open finish (the session
         core's grace period);
      4. the other services stop (timers, the metrics endpoint, which
         answers until then; the retention task finishes the transaction
         it is in, and the node leaves the POP3 session registry), for
         at most L{STOP_TIMEOUT} seconds: a database that does not answer
         must not hold the process;
      5. the store closes.

    @ivar store: the L{mailgate.interfaces.IMailStore} every protocol uses.
    @ivar metrics: the L{mailgate.metrics.Metrics} everything reports to.
    @ivar reactor: the reactor it runs on: given by L{makeService}, never
        looked up here.
    @ivar listeners: the L{ListeningService}s, by protocol name (C{"POP3"},
        C{"POP3S"}, C{"SMTP"}, C{"LMTP"}, C{"QUOTA-STATUS"}, C{"METRICS"}).
    @ivar exitOnStartupError: end the process with a one-line message when
        a listener cannot start (what C{twistd mailgate} wants), instead of
        raising L{ConfigurationError} (what an embedding application wants).
    @ivar logObserver: an L{ILogObserver} for the application this service
        joins, or C{None}: twistd logs through an application's observer
        component (see L{mailgate.logs}).
    @ivar sessions: the L{SessionTracker} every protocol factory registers
        its sessions with.
    @ivar policy: the L{mailgate.interfaces.IConnectionPolicy} every
        listener's sessions consult.
    @ivar shutdownGrace: seconds sessions get to finish when it stops.
    @ivar ownsStopSignals: the process is mailgate's (C{twistd mailgate}):
        once stopping, a further SIGTERM or SIGINT is logged and otherwise
        ignored, instead of asking the reactor to stop again (which Twisted
        answers with a C{ReactorNotRunning} traceback); the sessions keep
        their shutdown grace, and SIGKILL stops at once.
    """

    exitOnStartupError = False
    daemonized = False
    #: a daemonising twistd's terminal (a duplicate of its standard error,
    #: made before the fork): twistd hands the waiting parent only the
    #: first 100 octets of a start-up error, so mailgate writes it whole
    #: there itself.  Closed once the service has started.
    startupErrors = None
    ownsStopSignals = False
    #: the store is closed, or closing (the service stopped, or its start
    #: failed): it cannot start again (see L{_refuseStartOnceStopped})
    storeClosed = False
    #: the L{Deferred}s waiting for the stop under way (L{stopService}
    #: called again), or C{None} before any stop
    _stopWaiters = None
    #: the stop (or the undoing of a failed start) is over
    _stopFinished = False
    policy = None
    logObserver = None
    #: the L{TokenValidator} of POP3's OAUTHBEARER and XOAUTH2, if on (a
    #: reload applies changed oauth2-* settings to it while OAuth stays on)
    tokens = None
    #: the L{MailgateConfig} in service (for L{reloadConfig})
    config = None
    #: the last SIGHUP's reload failed in part (the configuration file, the
    #: TLS certificates, the log file): what is in service is what was
    #: before it (systemd's C{STATUS=} says so until a reload succeeds)
    lastReloadFailed = False
    #: the settings the configuration file changes that wait for a
    #: restart, as the last reload that read the file found them
    #: (C{config.restart_needed}, and a changed database)
    restartNeeded = ()
    #: failures of the reload under way (see L{lastReloadFailed})
    _reloadFailures = 0
    #: a function of no arguments returning the configuration as it is
    #: now (the file read again), for SIGHUP; C{None}: none to read again
    configSource = None
    log = Logger()

    def __init__(
        self, store, tls=None, *, reactor, reloadOnSIGHUP=False, metrics=None, shutdownGrace=30.0
    ):
        super().__init__()
        self.store = store
        self.tls = tls
        self.metrics = metrics
        self.listeners = {}
        self.reactor = self._reactor = reactor
        self.sessions = SessionTracker(reactor)
        self.shutdownGrace = shutdownGrace
        self._reloadOnSIGHUP = reloadOnSIGHUP
        self._hangupActions = []
        self._reloadWatchers = []
        self._stoppingCallbacks = []
        self._storeService = None
        #: the POP3, SMTP and LMTP factories, whose settings a reload changes
        self.sessionFactories = []
        #: the quota-status factories, whose recipient checks a reload
        #: changes as SMTP's and LMTP's
        self.quotaStatusFactories = []
        #: C{(event, text)} of what the configuration leaves that an
        #: administrator should know of, logged as warnings at start
        self.startupWarnings = []
        #: C{(event, format, fields)} of what the start did that an
        #: administrator looks for in the log (the schema it upgraded),
        #: logged at start
        self.startupNotices = []

    def setServiceParent(self, parent):
        if self.logObserver is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logObserver)
        return super().setServiceParent(parent)

    # -- SIGHUP ----------------------------------------------------------------

    def onHangup(self, action):
        """
        Call C{action()} on SIGHUP as well (reopening the log file), when
        SIGHUP handling is on.  An action that fails raises, or returns
        C{False} once it has logged why itself (the log file not
        reopened, L{mailgate.tap._reopenLog}): either way the reload
        counts as failed (L{lastReloadFailed}).
        """
        self._hangupActions.append(action)

    def onReload(self, begins, ends):
        """
        Call C{begins()} when a SIGHUP's reload starts and C{ends()} when it
        is over, failed or not (systemd hears C{RELOADING=1}, then
        C{READY=1}).
        """
        self._reloadWatchers.append((begins, ends))

    def hangup(self):
        """
        What SIGHUP does: run the L{onHangup} actions (the log file is
        reopened first, so what follows lands in the new one), read the
        configuration file again (L{reloadConfig}), then reload the TLS
        certificate and key.
        """
        for begins, _ in self._reloadWatchers:
            begins()
        try:
            self._reload()
        except BaseException:
            self.lastReloadFailed = True
            raise
        finally:
            if self.metrics is not None:
                self.metrics.reloaded(self.lastReloadFailed, self.restartNeeded)
            for _, ends in self._reloadWatchers:
                ends()

    def _reload(self):
        self._reloadFailures = 0
        self._runHangupActions("SIGHUP")
        if self.tls is None and not self._hangupActions and self.configSource is None:
            self.log.info(
                "SIGHUP: nothing to reload (no TLS certificate, no log file of mailgate's, "
                "no configuration file)",
                event="service.nothing_to_reload",
            )
        self.reloadConfig()
        self.reloadTLS()
        self.lastReloadFailed = self._reloadFailures > 0

    def reloadConfig(self):
        """
        Read the configuration again (L{configSource}: the file, under the
        same command line and environment) and apply what can change while
        sessions run, as Dovecot's and Postfix's reloads do (the tables of
        L{mailgate.reload}, which applies them: L{mailgate.reload.LIVE_SETTINGS}:
        which clients are traced; L{mailgate.reload.SESSION_SETTINGS} and
        L{mailgate.reload.NETWORK_SETTINGS}, for sessions opened after it;
        L{mailgate.reload.POLICY_SETTINGS}, the connection limits, penalty and
        bans, for what comes after it; L{mailgate.reload.STORE_SETTINGS}, the
        server's defaults for maildrops, for the next delivery and retention
        round; L{mailgate.reload.DELIVERY_SETTINGS},
        L{mailgate.reload.ERROR_SETTINGS}, L{mailgate.reload.LOGIN_SETTINGS}
        and L{mailgate.reload.STOP_SETTINGS}, for the recipients, error
        replies, logins and stop after it; L{mailgate.reload.NAME_SETTINGS},
        the host name, for the sessions opened after it;
        L{mailgate.reload.TIMER_SETTINGS}, the periods of the server's timers,
        from it on; the TLS settings, L{mailgate.reload.TLS_SETTINGS}, where
        TLS was on and stays on, as those reloads take another certificate
        file; and L{mailgate.reload.OAUTH2_SETTINGS}, where OAuth was on and
        stays on, for the logins after it); say which other settings changed,
        and take effect at the next restart.  A file that cannot be read,
        holds an invalid value or changes a setting to one a start would
        refuse (L{checkStartable}) is logged, and the configuration in
        service stays.

        @return: the names of the settings applied, or C{None} if the
            configuration could not be read.
        """
        return reloadConfiguration(
            self, checkStartable=checkStartable, makeTokenValidator=makeTokenValidator,
            policySettings=policySettings, traceSelection=traceSelection, storeLimits=storeLimits,
            smtpTimeoutWarning=smtpTimeoutWarning, postmasterWarning=postmasterWarning, traceWarning=traceWarning,
            quotaStatusActions=quotaStatusActions,
        )

    def reloadActionFailed(self):
        """
        Count a failed part of the reload under way (it has logged why):
        the reload as a whole is said to have failed (L{lastReloadFailed}).
        """
        self._reloadFailures += 1

    def readsConfiguration(self):
        """
        Whether a SIGHUP reads the configuration again (L{reloadConfig}).
        """
        return self.configSource is not None and self.config is not None

    def reopenLogs(self):
        """
        What SIGUSR1 does: the L{onHangup} actions only (the log file is
        reopened), for a logrotate rule written for another twistd service,
        which sends SIGUSR1 to have its log rotated.
        """
        if not self._hangupActions:
            self.log.info("SIGUSR1: no log file of mailgate's to reopen", event="service.nothing_to_reload")
        self._runHangupActions("SIGUSR1")

    def _runHangupActions(self, name):
        for action in self._hangupActions:
            try:
                if action() is False:
                    self._reloadFailures += 1
            except Exception:
                self._reloadFailures += 1
                self.log.failure("{signal}: a reload action failed", signal=name, event="service.reload_failed")

    def reloadTLS(self):
        """
        Load the TLS certificate and key again: new connections get the new
        certificate, established sessions keep theirs.  An unusable new
        pair is logged and the old one stays in service.

        @return: whether the reload succeeded.
        """
        if self.tls is None:
            return False
        try:
            self.tls.reload()
        except ConfigurationError as e:
            self._reloadFailures += 1
            self.log.error(
                "TLS reload failed, keeping the previous certificate: {error}",
                error=e,
                event="tls.reload_failed",
            )
            return False
        self._logCertificates("TLS certificate reloaded", "tls.reloaded")
        return True

    def _logCertificates(self, what, event):
        """
        Name the certificates in service, then warn of one that has
        expired (it is served all the same, its replacement may be on the
        way, but clients refuse it) or soon will, of a private key file
        others may read or replace, and of a chain that does not go with
        its certificate.
        """
        self.log.info(
            what + ": {certificates}",
            certificates=self.tls.describe(),
            subject=self.tls.subject,
            fingerprint=self.tls.fingerprint,
            event=event,
        )
        if self.metrics is not None:
            self.metrics.certificatesInService(
                (c.subject, c.keyType, c.fingerprint, c.notAfter.timestamp())
                for c in self.tls.certificates
                if c.notAfter is not None
            )
        for warning in self.tls.expiryWarnings():
            self.log.warn("{warning}", warning=warning, event="tls.expiry")
        for warning in self.tls.keyWarnings:
            self.log.warn("{warning}", warning=warning, event="tls.key_permissions")
        for warning in self.tls.chainWarnings:
            self.log.warn("{warning}", warning=warning, event="tls.chain")

    # -- starting ----------------------------------------------------------------

    def startService(self):
        self._refuseStartOnceStopped()
        try:
            super().startService()
        except ConfigurationError:
            # Started without privilegedStartService (an embedding
            # application's startService): a listener that cannot bind
            # fails here, with the services before it already running.
            self._abandonStart()
            raise
        self._closeStartupErrors()
        if self.tls is not None:
            self._logCertificates("TLS certificate in service", "tls.loaded")
            self._checkValidityDaily()
        for event, warning in self.startupWarnings:
            self.log.warn("{warning}", warning=warning, event=event)
        for event, format, fields in self.startupNotices:
            self.log.info(format, event=event, **fields)
        self._handleReloadSignals()
        if self.ownsStopSignals:
            # Once the reactor runs: it installs its own handlers then.
            self._reactor.callWhenRunning(self._stopOnceOnStopSignals)

    def _checkValidityDaily(self):
        """
        Warn of a certificate that has expired, ends soon or is not valid
        yet every L{TLS_VALIDITY_CHECK_INTERVAL} seconds while the server
        runs, not only at start and at reloads: a renewal that failed (an
        ACME client's, whose hook would have sent the SIGHUP) sends none,
        and the certificate in service ran out months after the start's
        line, with nothing said before clients refused it.
        """
        check = LoopingCall(self._warnOfValidity)
        check.clock = self._reactor
        check.start(TLS_VALIDITY_CHECK_INTERVAL, now=False)
        self.onStopping(lambda: check.stop() if check.running else None)

    def _warnOfValidity(self):
        for warning in self.tls.expiryWarnings():
            self.log.warn("{warning}", warning=warning, event="tls.expiry")

    def _handleReloadSignals(self):
        """
        Handle SIGHUP and SIGUSR1, when SIGHUP handling is on: always,
        whatever there is to reload, as their default action ends the
        process (systemctl reload sends SIGHUP; SIGUSR1 is twistd's own log
        rotation signal, which twistd does not install once mailgate has
        the log).

        From L{privilegedStartService} on, before the listeners bind: once
        one has said it listens, a script (or logrotate) may send SIGHUP,
        and the reactor, which runs L{startService}, is not running yet.
        The action waits for it.
        """
        if not self._reloadOnSIGHUP:
            return
        reactor = self._reactor
        for signum, action in ((signal.SIGHUP, self.hangup), (signal.SIGUSR1, self.reopenLogs)):
            self._handle(signum, lambda signum, frame, action=action: reactor.callFromThread(action))

    def privilegedStartService(self):
        self._refuseStartOnceStopped()
        self._handleReloadSignals()
        try:
            super().privilegedStartService()
        except Exception as e:
            self._abandonStart()
            if not isinstance(e, ConfigurationError):
                raise
            if self.daemonized:
                self._reportStartupError(e)
                logUncaughtOnce(self.log)
            if not self.exitOnStartupError or self.daemonized:
                # A daemonized twistd reports exceptions (not SystemExit)
                # back to the waiting parent, which prints them and exits 1.
                raise
            # twistd has pointed sys.stderr at the log by now.  (An error
            # where it is the journal's stream: logs.writeStartFailure.)
            writeStartFailure(sys.__stderr__ or sys.stderr, f"mailgate: {e}")
            raise StartupExit(_listenFailureStatus(e))

    def _refuseStartOnceStopped(self):
        """
        A service whose store is closed (it stopped, or its start failed)
        would listen and answer every session with a database error:
        refused, once and for all.
        """
        if self.storeClosed:
            raise RuntimeError(
                "this mailgate service has stopped and its store is closed: it cannot start "
                "again; make a new one with mailgate.service.makeService"
            )

    def _abandonStart(self):
        """
        Undo a start that failed (a listener that cannot bind): the
        listeners that bound stop listening, the services already started
        stop, the store closes (with it an SQLite database's claim), and
        the signal handlers before ours are back.  An embedding application
        that catches the L{ConfigurationError} is left with nothing of
        mailgate's holding a port or the database, and may make a new
        service once the configuration is corrected; before, the ports
        that did bind kept accepting connections and the database stayed
        claimed until the process ended.

        The ports close on the reactor's next turn; the store at once when
        no other service had started (the usual case: the listeners bind
        in L{privilegedStartService}, before the others start).
        """
        self._restoreHandlers()
        Service.stopService(self)
        self.storeClosed = True
        asked = [s for s in self if isinstance(s, ListeningService) and s.listenAsked]
        for listener in asked:
            defer.maybeDeferred(listener.stopService).addErrback(
                lambda f: self.log.failure("a listener failed to stop", f, event="service.stop_failed")
            )
        for ls in self.listeners.values():
            for listener in ls:
                if listener not in asked:
                    listener.giveUp(ShuttingDown("mailgate did not start: another listener could not bind"))
        started = [s for s in self if s not in asked and s is not self._storeService]
        self._stopWaiters = []
        d = self._stopAll(started, deadline=STOP_TIMEOUT).addCallback(lambda _: self._closeStore())
        d.addBoth(self._stopped)

    def _closeStore(self):
        """
        Close the store, whether its service started or not: it was opened
        when the service was made.
        """
        self.storeClosed = True
        if self._storeService is None:
            return None
        d = defer.maybeDeferred(self._storeService.stopService)
        d.addErrback(lambda f: self.log.failure("the store failed to close", f, event="service.stop_failed"))
        return d

    def _reportStartupError(self, error):
        self.log.error("mailgate: {error}", error=error, event="service.start_failed")
        if self.startupErrors is not None:
            try:
                self.startupErrors.write(f"mailgate: {error}\n")
                self.startupErrors.flush()
            except OSError:
                pass

    def _closeStartupErrors(self):
        if self.startupErrors is not None:
            try:
                self.startupErrors.close()
            except OSError:
                pass
            self.startupErrors = None

    def addListener(self, listener):
        listener.setServiceParent(self)
        self.listeners.setdefault(listener.protocolName, []).append(listener)

    def setStore(self, storeService):
        """
        Make C{storeService} the service that closes the store, last.
        """
        storeService.setServiceParent(self)
        self._storeService = storeService

    def whenListening(self):
        """
        A L{Deferred} that fires once every listener is bound.
        """
        waiting = [l.whenListening() for ls in self.listeners.values() for l in ls]
        return defer.gatherResults(waiting, consumeErrors=True).addCallback(lambda _: None)

    def databaseAnswers(self, timeout=HEALTH_TIMEOUT, writes=True):
        """
        Ask the database a trivial question (one indexed read).

        @param writes: whether the latest write transaction must have
            committed too (what delivering mail needs); without it, a
            database that reads but takes no writes (a full disk) is
            healthy, with a note saying so (what serving POP3 needs:
            logins and RETR read, only QUIT's removals write).
        @return: a L{Deferred} that fires (with C{None}, or without
            C{writes}, with the L{WritesFailing} note) when it answered
            within C{timeout} seconds, and fails otherwise (or at once,
            with L{ShuttingDown}, once the service is stopping).
        """
        if not self.running:
            return defer.fail(ShuttingDown("mailgate is shutting down"))
        database = getattr(self.store, "database", None)
        damage = getattr(database, "damage", None)
        if damage is not None:
            # Whatever this trivial question finds: the damage met on
            # other pages stays until the file is restored.
            return defer.fail(damage)
        failure = getattr(database, "writeFailure", None)
        note = None
        if failure is not None:
            # Reads may still work on a database that takes no writes (a
            # full disk): mail cannot be delivered, so this node is not
            # healthy for that until a write commits again (its heartbeat
            # writes every ten seconds).
            kind = getattr(database, "writeFailureKind", None) or "TemporaryFailure"
            note = WritesFailing(f"writes fail: {failure}", kind)
            if writes:
                return defer.fail(note)
        d = defer.maybeDeferred(self.store.hasDomain, "health-check.invalid")
        d.addTimeout(timeout, self._reactor)
        return d.addCallback(lambda _: note)

    def protocolAnswers(self, protocol, timeout=HEALTH_TIMEOUT):
        """
        Whether this node can serve C{protocol} (C{"pop3"}, C{"smtp"},
        C{"lmtp"}): for a balancer's check of one backend, which a
        database that takes no writes must not empty of POP3 nodes.

        @return: as L{databaseAnswers}, writes required for SMTP and LMTP
            (every delivery would be deferred) and not for POP3; failing
            with L{NotServed} when no listener of C{protocol} is
            configured here (a balancer's backend pointed at the wrong
            node, or a node started without that listener, is then seen).
        """
        if not self.running:
            return defer.fail(ShuttingDown("mailgate is shutting down"))
        names = {
            "pop3": ("POP3", "POP3S"), "smtp": ("SMTP",), "lmtp": ("LMTP",), "quota-status": ("QUOTA-STATUS",),
        }[protocol]
        if not any(self.listeners.get(name) for name in names):
            return defer.fail(NotServed(f"this node has no {protocol} listener"))
        # quota-status reads (users and their use) and writes nothing.
        return self.databaseAnswers(timeout, writes=protocol not in ("pop3", "quota-status"))

    # -- stopping ------------------------------------------------------------------

    def onStopping(self, callback):
        """
        Call C{callback()} first thing when the service starts stopping.
        """
        self._stoppingCallbacks.append(callback)

    def stopTimeLimit(self):
        """
        Seconds a stop takes at most: the grace, the wait for sessions to
        close once it is over, and L{STOP_MARGIN} for the listeners, the
        services after them and the store's threads, each bounded.  systemd
        hears it with C{STOPPING=1} (L{mailgate.systemd}), so that a grace
        longer than the unit's C{TimeoutStopSec} is not cut short by its
        SIGKILL, nor a stop with a database that hangs (each bound waited
        for in full): the process ends by itself, and the unit as stopped,
        not timed out.
        """
        return self.shutdownGrace + self.sessions.abortDelay + STOP_MARGIN

    def drainSessions(self):
        """
        Wait for the sessions still open once the listeners are closed:
        they get L{shutdownGrace} seconds to finish (see
        L{SessionTracker.shutdown}).

        @return: a L{Deferred} that fires when they are done.
        """
        return self.sessions.shutdown(self.shutdownGrace)

    def _handle(self, signum, handler):
        processSignals.handle(self, signum, handler)

    def _restoreHandlers(self):
        processSignals.release(self)

    def _ignoreReloadsWhileStopping(self):
        """
        While the sessions finish, SIGHUP and SIGUSR1 are logged and
        ignored: their default action would end the process there and then,
        and with it the sessions the grace period is for.
        """

        reactor = self._reactor

        def ignored(signum, frame):
            # Logged by the reactor, not here: a handler runs between any
            # two steps of the main thread, in the middle of a log write
            # too (a full journal pipe), and a second write into the same
            # stream from here would fail and take the log observer out.
            reactor.callFromThread(
                self.log.info,
                "{signal} ignored: stopping",
                signal=signal.Signals(signum).name,
                event="service.stopping_already",
            )

        for signum in processSignals.handledBy(self):
            processSignals.handle(self, signum, ignored)

    def stopService(self):
        if self._stopWaiters is not None:
            # Stopped again (an application's own stop after it stopped
            # mailgate, which stops every child again; disownServiceParent):
            # the stop under way is the one, waited for, not run twice.
            return self._whenStopped()
        self._stopWaiters = []
        self.storeClosed = True
        self._ignoreReloadsWhileStopping()
        Service.stopService(self)
        if self.ownsStopSignals:
            self._ignoreFurtherStopSignals()
        for callback in self._stoppingCallbacks:
            try:
                callback()
            except Exception:
                self.log.failure("stopping callback {callback!r} failed", callback=callback, event="service.stop_failed")
        # A listener never started is not stopped (_stopAll): it is told
        # here that it will never listen, or a wait for it never ended.
        for ls in self.listeners.values():
            for listener in ls:
                if not (listener.running or listener.listenAsked or listener.port is not None):
                    listener.giveUp(ShuttingDown("mailgate stopped before it listened"))
        return self._stopInOrder().addBoth(self._stopped)

    def _whenStopped(self):
        """
        A L{Deferred} that fires when the stop under way is over (at once
        if it is).
        """
        if self._stopFinished:
            return defer.succeed(None)
        d = defer.Deferred()
        self._stopWaiters.append(d)
        return d

    def _stopped(self, result):
        self._stopFinished = True
        waiters, self._stopWaiters = self._stopWaiters, []
        for d in waiters:
            d.callback(None)
        return result

    def _stopSignalAgain(self, signum, frame):
        """
        A SIGTERM or SIGINT once stopping: logged (by the reactor: see
        L{_ignoreReloadsWhileStopping}), and otherwise nothing.
        """
        grace = self.shutdownGrace
        self._reactor.callFromThread(
            self.log.info,
            "{signal} again: already stopping; open sessions have at most {grace} " + noun(grace, "second") + " "
            "in all to finish (SIGKILL stops at once)",
            signal=signal.Signals(signum).name,
            grace=grace,
            event="service.stopping_already",
        )

    def _stopOnceOnStopSignals(self):
        """
        The reactor's own SIGTERM and SIGINT handlers, called for the first
        of them only.  A second signal that came before the reactor had
        acted on the first (two in a row: C{timeout}, which signals the
        process and then its group; an impatient Ctrl-C) asked the reactor
        to stop a second time, which it refused with a critical
        C{ReactorNotRunning} traceback in the log (seen in 6 of 18 runs of
        a real twistd given two SIGTERMs up to 2.5 ms apart).  Later ones
        are logged as L{_ignoreFurtherStopSignals} has them.
        """
        stopping = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            reactors = signal.getsignal(signum)
            if not callable(reactors):
                continue

            def once(signum, frame, reactors=reactors):
                if stopping:
                    self._stopSignalAgain(signum, frame)
                else:
                    stopping.append(signum)
                    reactors(signum, frame)

            signal.signal(signum, once)

    def _ignoreFurtherStopSignals(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stopSignalAgain)

    @defer.inlineCallbacks
    def _stopInOrder(self):
        mail = [s for s in self if isinstance(s, ListeningService) and s.protocolName in MAIL_PROTOCOLS]
        yield self._stopAll(mail)
        yield self.drainSessions()
        yield self._stopAll(
            [s for s in self if s not in mail and s is not self._storeService], deadline=STOP_TIMEOUT
        )
        yield self._closeStore()
        # Nothing is left to interrupt: the handlers before ours again.
        self._restoreHandlers()

    def _stopAll(self, services, deadline=None):
        """
        Stop C{services} together.

        @param deadline: seconds to wait for them at most, or C{None} for
            as long as they take: past it, the ones still stopping are
            named in a warning and left to it.
        @return: a L{Deferred} that fires when they have stopped (or the
            deadline passed); it never fails.
        """
        # A listener is bound from privilegedStartService on, before it
        # runs (a stop between the two left its port open).
        stopping = [
            (s, defer.maybeDeferred(s.stopService))
            for s in reversed(services)
            if s.running or getattr(s, "listenAsked", False)
        ]
        pending = [s for s, _ in stopping]

        def stopped(result, service):
            pending.remove(service)
            return result

        for service, d in stopping:
            d.addBoth(stopped, service)

        def logFailures(results):
            for ok, result in results:
                if not ok:
                    self.log.failure("a service failed to stop", result, event="service.stop_failed")

        done = defer.DeferredList([d for _, d in stopping], consumeErrors=True).addCallback(logFailures)
        if deadline is None:
            return done
        waited = defer.Deferred()

        def late():
            self.log.warn(
                "{services} did not stop within {seconds:g} " + noun(deadline, "second") + " "
                "(the database not answering?): "
                "stopping without waiting any longer",
                services=", ".join(_serviceName(s) for s in pending),
                seconds=deadline,
                event="service.stop_timeout",
            )
            waited.callback(None)

        timer = self._reactor.callLater(deadline, late)

        def finished(_):
            if timer.active():
                timer.cancel()
                waited.callback(None)

        done.addCallback(finished)
        return waited


def _serviceName(service):
    """
    How a warning names C{service}: its name, or its class's.
    """
    return service.name or type(service).__name__


def _endpoint(reactor, description, balancers=()):
    try:
        checkEndpoint(description, adopting=True)
        return serverEndpoint(reactor, description, balancers=balancers)
    except Exception as e:
        raise ConfigurationError(" ".join(str(e).split()) or f"invalid endpoint {description!r}") from None


def makePolicy(policyStore, config, reactor, metrics=None, maxConnections=None):
    """
    The connection policy from C{config}: limits, the authentication
    penalty and bans, kept in C{policyStore} (an
    L{mailgate.interfaces.IPolicyStore}: in the database, every node shares
    them).

    @param maxConnections: the limit on connections in all to enforce, if
        not C{config}'s (lowered to fit the open file limit: see
        L{mailgate.policy.descriptors}).
    @raise ConfigurationError: for settings out of range.
    """
    from mailgate.policy.connection import ConnectionPolicy

    settings = policySettings(config, maxConnections)
    return ConnectionPolicy(policyStore, reactor, settings, metrics=metrics, defaultRealm=config.authDefaultRealm)


def policySettings(config, maxConnections=None):
    """
    The L{PolicySettings} of C{config} (L{POLICY_SETTINGS}), at start and
    at each reload that changes them.

    @param maxConnections: as for L{makePolicy}.
    @raise ConfigurationError: for settings out of range.
    """
    from mailgate.policy.settings import PolicySettings

    try:
        return PolicySettings(
            maxConnections=config.maxConnections if maxConnections is None else maxConnections,
            maxConnectionsPerAddress=config.maxConnectionsPerAddress,
            authPenaltyMax=config.authPenaltyMax,
            banAfter=config.banAfter,
            banWindow=config.banWindow,
            banTime=config.banTime,
            unknownRecipientSlowAfter=config.unknownRecipientSlowAfter,
            unknownRecipientBanAfter=config.unknownRecipientBanAfter,
            exemptNetworks=config.exemptNetworks,
        )
    except ValueError as e:
        raise ConfigurationError(f"connection policy: {e}") from None


def storeLimits(config):
    """
    The server's defaults for maildrops from C{config} (L{STORE_SETTINGS}),
    which the store reads at each delivery and retention round.
    """
    return StoreLimits(
        quotaOctets=config.defaultQuota,
        expireDays=config.expireDays,
        keepDeletedDays=config.keepDeletedDays,
        quotaWarnings=config.quotaWarnings,
        duplicateWindow=config.duplicateWindow,
    )


def postmasterWarning(config):
    """
    What to warn of, if anything, in C{config}'s postmaster: none, where
    SMTP listens, at start and at the reload that takes it away.
    """
    if config.smtp and config.postmaster is None:
        return (
            "SMTP listens without --postmaster: mail to postmaster, which RFC 5321 requires "
            "every SMTP server to accept, is refused (550) unless a user of that name exists; "
            "name the user who receives it with --postmaster"
        )
    return None


def traceWarning(config):
    """
    What to warn of, if anything, in C{config}'s tracing: whose commands
    and replies go to the log, at start and at the reload that adds or
    changes whom (a trace left on by mistake is a log full of a user's
    mail commands).
    """
    if config.debugPeers or config.debugUsers:
        traced = [f"clients on {n}" for n in config.debugPeers] + [f"user {u}" for u in config.debugUsers]
        return (
            f"tracing the sessions of {', '.join(traced)} (--debug-peer, --debug-user): their commands "
            "and replies go to the log; take the options away when done"
        )
    return None


def smtpTimeoutWarning(config):
    """
    What to warn of, if anything, in C{config}'s smtp-idle-timeout: less
    than RFC 5321 asks of a server, where a slow client's MTA (one that
    checks a message before its final dot's reply) is cut off, and retries.
    """
    if (config.smtp or config.lmtp) and config.smtpIdleTimeout < SMTP_SERVER_TIMEOUT:
        return (
            f"smtp-idle-timeout {config.smtpIdleTimeout} is under the {SMTP_SERVER_TIMEOUT} seconds RFC 5321 "
            "(section 4.5.3.2.7) asks an SMTP server to wait: clients that pause longer between commands are "
            "disconnected (421) and try again later"
        )
    return None



def makeTokenValidator(config):
    """
    The validator of OAuth 2.0 access tokens (OAUTHBEARER, XOAUTH2) from
    C{config}'s oauth2 settings, its keys read; C{None} without oauth2-keys.

    @raise ConfigurationError: a key file cannot be read or holds no key.
    """
    if not config.oauth2Keys:
        return None
    return TokenValidator(
        config.oauth2Keys, config.oauth2Issuers, config.oauth2Audiences, config.oauth2Algorithms,
        leeway=config.oauth2ClockSkew, usernameClaim=config.oauth2UsernameClaim,
    )


def makePOP3Factory(
    store, config, reactor, tls=None, metrics=None, tracker=None, policy=None, affinity=None, tokens=None
):
    """
    The POP3 factory for C{store}: the portal with its checkers, SASL, and
    the session policy from C{config}; its sessions are registered with
    C{tracker}.

    @param affinity: the L{CPUAffinity} of the reactor thread, if pinned
        (password hashes then run on threads freed of it).
    @param tokens: the L{TokenValidator} of OAuth 2.0 bearer tokens; by
        default made from C{config} (L{makeTokenValidator}).
    """
    if tokens is None:
        tokens = makeTokenValidator(config)
    portal = makePortal(
        store,
        threadRunner(reactor, affinity),
        cache=VerifiedCredentialCache(
            maxEntries=config.authCacheSize, lifetime=float(config.authCacheTTL), metrics=metrics
        ),
        apop=config.apop.checked,
        loginDelay=config.loginDelay,
        defaultRealm=config.authDefaultRealm,
        tokens=tokens,
        masterUsers=masterLogins(config),
    )
    # EXPIRE in CAPA: the store's retention, where it has one.
    expire = store.retention.capability if ILifecycleStore.providedBy(store) else None
    factory = POP3Factory(
        portal,
        hostname=config.hostname,
        apop=config.apop.advertiser(store),
        idleTimeout=config.idleTimeout,
        loginTimeout=config.loginTimeout,
        greeting=config.greeting,
        authFailureDelay=config.authFailureDelay,
        reactor=reactor,
        loginDelay=config.loginDelay,
        tls=tls,
        trustedNetworks=networksOf(config.trustedNetworks),
        metrics=metrics,
        tracker=tracker,
        policy=policy,
        expire=expire,
        defaultRealm=config.authDefaultRealm,
        clientWorkarounds=config.pop3ClientWorkarounds,
        masterUserSeparator=config.masterUserSeparator,
        xclientNetworks=config.xclientNetworks,
    )
    # CRAM-MD5 works for users with APOP (and for those with Dovecot's CRAM-MD5
    # states): offered by nearly the same rule as APOP.
    factory.sasl = SASLServer(
        store.findUser, factory.hostname, offerCramMD5=factory.offersCramMD5, sharedSecret=store.sharedSecret,
        defaultRealm=config.authDefaultRealm, bearerTokens=tokens is not None, scramParameters=store.scramParameters,
        clock=reactor.seconds, masterUsers=masterLogins(config), masterUserSeparator=config.masterUserSeparator,
    )
    factory.trace = traceSelection(config)
    return factory


def masterLogins(config):
    """
    Whether master users may log in to other users' maildrops: with
    C{--master-users}, or with a C{--master-user-separator} (which means
    nothing without them).
    """
    return config.masterUsers or config.masterUserSeparator is not None


def traceSelection(config):
    """
    The clients whose sessions are traced (C{--debug-peer},
    C{--debug-user}), or C{None}.
    """
    selection = TraceSelection(config.debugPeers, config.debugUsers)
    return selection if selection else None


def makeSMTPFactory(
    store, config, reactor, lmtp=False, tls=None, metrics=None, tracker=None, policy=None
):
    """
    The SMTP (or LMTP) factory for C{store}, with the limits from C{config}.
    """
    factoryClass = LMTPFactory if lmtp else SMTPFactory
    spoolDirectory = checkedSpoolDirectory(config)
    factory = factoryClass(
        makeDelivery(store, config),
        hostname=config.hostname,
        maxMessageSize=config.maxMessageSize,
        maxRecipients=config.maxRecipients,
        minDataRate=config.minDataRate,
        idleTimeout=config.smtpIdleTimeout,
        reactor=reactor,
        tls=tls,
        metrics=metrics,
        tracker=tracker,
        policy=policy,
        spoolDirectory=spoolDirectory,
        cleartextNetworks=networksOf(config.lmtpCleartextNetworks if lmtp else config.smtpCleartextNetworks),
        xclientNetworks=config.xclientNetworks,
    )
    if not lmtp:
        # Error replies past the soft limit wait (SMTPServer.softErrorLimit);
        # LMTP's client is the site's own MTA.
        factory.softErrorLimit = config.smtpSoftErrorLimit
        factory.errorSleepTime = config.smtpErrorSleepTime
    factory.trace = traceSelection(config)
    return factory


def makeDelivery(store, config):
    """
    The recipient checks and delivery of SMTP, LMTP and quota-status for
    C{store}, with the settings from C{config}.
    """
    return LocalDelivery(
        store, config.domains or None, quotaExceeded=config.quotaExceeded, postmaster=config.postmaster,
        recipientDelimiter=config.recipientDelimiter, deliveredTo=config.deliveredTo,
    )


def makeQuotaStatusFactory(store, config, reactor, metrics=None):
    """
    The quota-status (Postfix policy service) factory for C{store}: the
    RCPT check of SMTP and LMTP, answered with C{config}'s actions to the
    peers of its networks.
    """
    from mailgate.smtp.policyservice import QuotaStatusFactory

    return QuotaStatusFactory(
        makeDelivery(store, config), reactor, quotaStatusActions(config), networks=config.quotaStatusNetworks,
        hostname=config.hostname or machineName(), metrics=metrics,
        maxConnections=config.quotaStatusMaxConnections,
    )


def quotaStatusActions(config):
    """
    What quota-status answers (C{--quota-status-success}, C{-nouser},
    C{-overquota}, C{-toolarge}): made at start, and again by a reload
    that changes one (L{mailgate.reload.QUOTA_STATUS_ACTIONS}).
    """
    from mailgate.smtp.policyservice import QuotaStatusActions

    return QuotaStatusActions(
        success=config.quotaStatusSuccess, nouser=config.quotaStatusNouser,
        overquota=config.quotaStatusOverquota, toolarge=config.quotaStatusToolarge,
    )


def checkedSpoolDirectory(config):
    """
    C{config.spoolDirectory}, once a message could be spooled there
    (L{mailgate.message.checkSpoolDirectory}), or C{None} if unset.

    @raise ConfigurationError: it does not exist, is not a directory, or
        the server's user may not make files in it.
    """
    if config.spoolDirectory is None:
        return None
    try:
        checkSpoolDirectory(config.spoolDirectory)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigurationError(f"spool-directory: cannot spool messages in {config.spoolDirectory}: {reason}") from None
    return config.spoolDirectory


def logUncaughtOnce(log):
    """
    Have the exception that is about to end this process (a daemonized
    twistd re-raises a failed start, after telling its parent) logged as
    one event with its traceback, rather than printed by Python: twistd
    points standard error at the log, which took each line of the
    printed traceback for an event of its own, so that a JSON log had
    some fifty C{stderr} records, one line of the traceback each, after
    the start's C{service.start_failed} line.  The hook is put back as it
    was once it has run: only the process's end is concerned.
    """
    previous = sys.excepthook

    def logged(kind, value, tb):
        sys.excepthook = previous
        # Formatted by Python, as it would have printed it: the chained
        # causes (the listener's own error) included, which a Failure's
        # traceback leaves out.
        log.error(
            "mailgate did not start:\n{traceback}",
            traceback="".join(traceback.format_exception(kind, value, tb)).rstrip("\n"),
            event="service.start_traceback",
        )

    sys.excepthook = logged


def checkStartable(config, names=None):
    """
    Build what a start builds from C{config} before it binds or opens the
    database, and would refuse to start on: the TLS contexts from the
    certificate and key files, the CPU affinity, the spool directory, the
    database URL's values (checked without connecting); at a reload, the
    listeners of a changed listener setting (L{mailgate.listenercheck.checkListenersForTheRestart}).
    C{mailgate config --check} checks them all; a reload those of the
    settings it changes (C{names}), which it would otherwise take for the
    next restart, a restart that then failed.

    @return: the L{ServerTLS} built, if any.
    @raise ConfigurationError: what a start would refuse.
    """
    tls = None
    if names is None or names & TLS_SETTINGS:
        tls = makeTLS(config)
    if names is None or "cpu-affinity" in names:
        makeAffinity(config)
    if names is None or "spool-directory" in names:
        checkedSpoolDirectory(config)
    if names is None or "database" in names:
        checkDatabaseURL(config.database)
    if names is None or names & OAUTH2_SETTINGS:
        makeTokenValidator(config)
    if names is not None:
        checkListenersForTheRestart(config, names)
    return tls


def makeTLS(config):
    """
    The server TLS from C{config}, or C{None} if no certificate is set.

    @raise ConfigurationError: if only one of certificate and key is set
        (see L{checkConfig}), or they cannot be loaded.
    """
    checkConfig(config)
    if config.tlsCertificate is None:
        return None
    alternative = None if config.tlsAltCertificate is None else (config.tlsAltCertificate, config.tlsAltKey)
    named = [splitCertificatePair(value) for value in config.tlsNamedCertificates]
    return ServerTLS(
        config.tlsCertificate, config.tlsKey, alternative, config.tlsMinVersion, named, config.tlsCiphers
    )


def makeAffinity(config):
    """
    The L{CPUAffinity} of C{config.cpuAffinity}, or C{None} if unset.

    @raise ConfigurationError: a CPU this process may not run on, or a
        system without CPU affinity.
    """
    if config.cpuAffinity is None:
        return None
    try:
        return CPUAffinity(parseCPUs(config.cpuAffinity))
    except ValueError as e:
        raise ConfigurationError(f"cpu-affinity: {e}") from None


def makeService(config, reactor=None, store=None, metrics=None, policyStore=None):
    """
    Build mailgate's service hierarchy.

    @param config: a L{MailgateConfig}.
    @param reactor: the reactor to listen with; the global one by default.
    @param store: an already opened store to use instead of opening
        C{config.database}.  It is the service's from then on: closed
        when the service stops (or its start fails), as one it opened
        would be, so a store shared with anything else must not be
        given to it.
    @param policyStore: where the connection policy keeps failed logins and
        bans (an L{mailgate.interfaces.IPolicyStore}): by default, the
        database of C{config.database} when mailgate opens it, shared by
        every node; for a C{store} given here, this process's memory unless
        its policy store is given too.
    @param metrics: the L{Metrics} to report to; a new one (with its own
        registry) by default.
    @raise ConfigurationError: if the database cannot be opened or an
        endpoint description is invalid.
    """
    if reactor is None:
        from twisted.internet import reactor
    # Before any value is used: an embedder's MailgateConfig(...) has had
    # none of the command line's or the file's checks.
    checkConfig(config)
    listeners = {
        name: [(d, _endpoint(reactor, d, config.proxyNetworks)) for d in descriptions]
        for name, descriptions in (
            ("POP3", config.pop3),
            ("POP3S", config.pop3s),
            ("SMTP", config.smtp),
            ("LMTP", config.lmtp),
            ("QUOTA-STATUS", config.quotaStatus),
            ("METRICS", [config.metrics] if config.metrics else []),
        )
    }
    tls = makeTLS(config)
    affinity = makeAffinity(config)
    tokens = makeTokenValidator(config)
    # Whatever listens: config --check and a reload refuse a spool
    # directory that cannot be used, and mailgate deliver uses the file's;
    # checked only for SMTP and LMTP, a POP3 server started on a file
    # that every systemctl reload then refused.
    checkedSpoolDirectory(config)
    if metrics is None:
        metrics = Metrics()
    opened = store is None
    if opened:
        store = openStore(config.database, reactor, metrics=metrics)
        if policyStore is None:
            from mailgate.store.policy import SQLPolicyStore

            policyStore = SQLPolicyStore(store.database)
    if policyStore is None:
        from mailgate.policy.memory import MemoryPolicyStore

        policyStore = MemoryPolicyStore()
    try:
        root = _assemble(config, reactor, store, metrics, policyStore, tls, affinity, listeners, tokens)
    except BaseException:
        # A setting refused once the database is open (the spool
        # directory, the connection policy's limits): the store opened
        # here closes, or an embedding application that corrects the
        # setting and calls again is refused an SQLite database "in use
        # by another mailgate server" (its own first attempt's claim).
        if opened:
            store.close()
        raise
    if opened:
        # Logged at start, with the warnings: under twistd the store is
        # opened before the log begins.
        notice = schemaUpgradeNotice(store.migrationsApplied)
        if notice is not None:
            root.startupNotices.append(notice)
    return root


def _metricsSite(metrics, root, reactor):
    """
    The HTTP factory of C{--metrics} for the service C{root}.
    """
    # Imported here: Twisted Web, which it needs, is for servers with a --metrics listener only.
    from mailgate.metricssite import metricsSite

    return metricsSite(metrics, root.databaseAnswers, reactor, HEALTH_TIMEOUT, protocolCheck=root.protocolAnswers)


def _assemble(config, reactor, store, metrics, policyStore, tls, affinity, listeners, tokens=None):
    """
    The service hierarchy of L{makeService}, over an open C{store}, with
    the endpoints of C{listeners} (by protocol name) already checked.
    """
    root = MailgateService(
        store, tls, reactor=reactor, reloadOnSIGHUP=config.reloadOnSIGHUP, metrics=metrics,
        shutdownGrace=config.shutdownGrace,
    )
    root.config = config
    # Any IMailStore may be given (mailgate.testing's FaultInjectingStore
    # too): only an SQL store has an engine, and only SQLite's a file.
    databaseFile = getattr(getattr(store, "engine", None), "path", None)
    if databaseFile:
        warning = databaseFileWarning(databaseFile)
        if warning:
            root.startupWarnings.append(("database.file_permissions", warning))
        warning = databaseDirectoryWarning(databaseFile)
        if warning:
            root.startupWarnings.append(("database.directory_permissions", warning))
    warning = postmasterWarning(config)
    if warning:
        root.startupWarnings.append(("smtp.no_postmaster", warning))
    for warning in openSockets(config):
        root.startupWarnings.append(("listener.socket_open", warning))
    warning = traceWarning(config)
    if warning:
        root.startupWarnings.append(("trace.enabled", warning))
    warning = smtpTimeoutWarning(config)
    if warning:
        root.startupWarnings.append(("config.smtp_idle_timeout_short", warning))
    if affinity is not None:
        # First, so that the threads started after it (the database's, when
        # the reactor starts) are started pinned.
        AffinityService(affinity).setServiceParent(root)
    root.setStore(StoreService(store))
    MemoryTrimmer(reactor, root.sessions, interval=config.memoryTrimInterval).setServiceParent(root)
    if tls is not None:
        TicketKeyRotation(tls, reactor, config.tlsTicketKeyRotation).setServiceParent(root)
    maxConnections, warning = fittedConnectionLimit(
        config.maxConnections, openFileLimit(), quotaStatusConnections(config)
    )
    if warning:
        root.startupWarnings.append(("limits.open_files", warning))
    metrics.connectionLimit(maxConnections)
    policy = root.policy = makePolicy(policyStore, config, reactor, metrics, maxConnections=maxConnections)
    # The mail listeners accept once the bans are read (not the metrics one).
    mailListeners = lambda: [l for name, ls in root.listeners.items() if name != "METRICS" for l in ls]  # noqa: E731
    PolicyService(policy, reactor, heldListeners=mailListeners).setServiceParent(root)
    lifecycle = ILifecycleStore.providedBy(store)
    if lifecycle:
        store.limits = storeLimits(config)
        # The store's background work: retention, and what POP3 advertises
        # of it (refreshed like the APOP advertiser).
        RetentionService(store, reactor, refreshInterval=APOP_REFRESH, metrics=metrics).setServiceParent(root)
        # The node's heartbeat, with the settings it works with, and the
        # registry of its POP3 sessions (mailgate who, mailgate kick):
        # written by every node, so one that only takes mail in counts
        # too where the nodes' retention settings are compared.
        # Named as --hostname names the machine (its default, the machine's
        # FQDN, too: without one the name was the registry's own default,
        # with the id of a process twistd forks away from).
        RegistryService(
            store, reactor, name=config.hostname or machineName(), metrics=metrics,
            quotaExceeded=config.quotaExceeded,
            recipientDelimiter=config.recipientDelimiter,
        ).setServiceParent(root)
    pop3 = []

    def pop3Factory():
        if not pop3:
            factory = makePOP3Factory(
                store, config, reactor, tls, metrics=metrics, tracker=root.sessions, policy=policy,
                affinity=affinity, tokens=tokens,
            )
            root.tokens = tokens
            if tokens is not None:
                for warning in tokens.keyWarnings:
                    root.startupWarnings.append(("oauth2.key_permissions", warning))
                # Read again at each SIGHUP: by reloadConfig, after the
                # file, where it reads one (L{mailgate.reload._reloadTokens}).
                root.onHangup(lambda: None if root.readsConfiguration() else reloadTokenKeys(tokens, root.log))
            if isinstance(factory.apop, APOPAdvertiser):
                # Fire and forget: a slow database must not hold up shutdown.
                refresh = TimerService(APOP_REFRESH, lambda: factory.apop.refresh() and None)
                refresh.clock = reactor
                refresh.setServiceParent(root)
            pop3.append(factory)
        return pop3[0]

    builders = {
        "POP3": pop3Factory,
        "POP3S": lambda: TLSLayerFactory(tls, pop3Factory(), reactor),
        "SMTP": lambda: makeSMTPFactory(
            store, config, reactor, tls=tls, metrics=metrics, tracker=root.sessions, policy=policy
        ),
        "LMTP": lambda: makeSMTPFactory(
            store, config, reactor, lmtp=True, tls=tls, metrics=metrics, tracker=root.sessions, policy=policy
        ),
        "QUOTA-STATUS": lambda: makeQuotaStatusFactory(store, config, reactor, metrics),
        "METRICS": lambda: _metricsSite(metrics, root, reactor),
    }
    for name, endpoints in listeners.items():
        if endpoints:
            factory = builders[name]()
            for description, endpoint in endpoints:
                root.addListener(ListeningService(name, description, endpoint, factory, reactor, metrics))
            if name in ("SMTP", "LMTP"):
                root.sessionFactories.append(factory)
            elif name == "QUOTA-STATUS":
                root.quotaStatusFactories.append(factory)
    root.sessionFactories.extend(pop3)
    return root
