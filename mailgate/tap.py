# -*- test-case-name: tests.test_tap -*-
"""
C{twistd mailgate}: command-line options and the service maker.

The options are generated from L{mailgate.config.SETTINGS}, where each one
is declared once; C{--config PATH} adds a TOML file whose keys are the same
long option names, and the command line overrides it.

Parsing has no side effects (no reactor, no database): L{Options} only
checks and collects; L{makeService} opens the store and builds the services.
"""

import contextlib
import functools
import os
import pwd
import signal
import stat
import sys

import attr
from twisted.logger import Logger
from twisted.python import usage

from mailgate import config as configuration
from mailgate import logs, systemd, twistedcompat
from mailgate.errors import ConfigurationError, UnavailableAtStart
from mailgate.owners import ownerName
from mailgate.service import checkedSpoolDirectory
from mailgate.service import makeService as _makeService
from mailgate.signals import HeldSignals
from mailgate.store.schema import observingUpgrades
from mailgate.timers import monotonicTimers
from mailgate.urls import hasPassword

_log = Logger()


def _valueHandler(setting):
    def handler(self, text):
        try:
            value = setting.kind.fromText(text)
        except ValueError as e:
            raise usage.UsageError(f"--{setting.name}: {e}") from None
        if setting.repeated:
            self.given.setdefault(setting.name, []).append(value)
        else:
            self.given[setting.name] = value

    handler.__doc__ = _help(setting)
    return handler


def _flagHandler(setting, flag, value):
    def handler(self):
        previous = self._flagsGiven.setdefault(setting.name, flag)
        if previous != flag:
            raise usage.UsageError(f"--{previous} and --{flag} contradict each other")
        self.given[setting.name] = value

    handler.__doc__ = (
        f"Same as {setting.name} = {setting.kind.toTOML(value)} in a configuration file.  "
        + _help(setting)
    )
    return handler


def _help(setting):
    text = setting.help
    if setting.repeated:
        text += "  Repeat for several; given here, replaces the configuration file's list."
    return f"{text}  Default: {setting.describeDefault()}."


def _installHandlers(cls):
    """
    Give C{cls} one C{opt_} method per setting of its C{settings} (two for
    the APOP flags), which is how L{usage.Options} finds options.
    """
    for setting in cls.settings:
        if setting.flags:
            for flag, value in setting.flags.items():
                setattr(cls, "opt_" + flag.replace("-", "_"), _flagHandler(setting, flag, value))
        else:
            setattr(cls, "opt_" + setting.name.replace("-", "_"), _valueHandler(setting))


def _silenceStandardOutput():
    """
    Point standard output's descriptor at the null device: its reader is
    gone, and the interpreter's flush at exit would otherwise report the
    broken pipe again ("Exception ignored ...").
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


class Options(usage.Options):
    """
    The options of C{twistd mailgate}: one per L{mailgate.config.Setting},
    plus C{--config}.

    @cvar settings: the declarations the options are made from; a subclass
        with other C{settings} (and the C{configClass} made from them by
        L{mailgate.config.makeConfigClass}) gets its options made too.
    @ivar given: the settings given on the command line, by name.
    @ivar config: the resolved configuration, after parsing.
    """

    settings = configuration.SETTINGS
    configClass = configuration.MailgateConfig

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _installHandlers(cls)

    synopsis = "[options]"
    longdesc = (
        "mailgate serves POP3 from a database of maildrops (embedded SQLite "
        "by default) and takes mail in over SMTP and LMTP.  Listeners are "
        "Twisted strports descriptions, e.g. "
        "tcp:110, tcp:1110:interface=127.0.0.1, "
        "unix:/run/mailgate/lmtp, systemd:domain=INET:index=0, "
        "haproxy:tcp:110; for POP3 with TLS from the first byte, --pop3s "
        "tcp:995 with --tls-cert and --tls-key (reloaded on SIGHUP).  Every "
        "option can also be set in a TOML file (--config), under its long "
        "name; the command line wins."
    )

    def __init__(self):
        super().__init__()
        self.given = {}
        self._flagsGiven = {}
        self.configPath = None
        self.config = None

    def parseOptions(self, options=None):
        """
        Parse, as L{usage.Options} does; under twistd (a C{parent} set),
        a usage error ends the process with one line on standard error and
        exit status 78 (EX_CONFIG), as the same value in the configuration
        file does.

        twistd itself would print its whole usage text (over two hundred
        lines, on standard output) before the error, which then scrolls by
        unseen or fills a journal, and exit 1, which a systemd unit's
        C{Restart=on-failure} retries every two seconds for ever on a
        command line (the unit's C{ExecStart=}) that only an edit can
        mend; its C{RestartPreventExitStatus=78} stops at this one.  This
        is mailgate's own parser, which twistd calls as its subcommand's:
        twistd's own options (before C{mailgate} on its command line) are
        refused by twistd, exit 1, out of mailgate's reach.  Parsed alone
        (tests, C{mailgate serve}), the L{usage.UsageError} is raised as
        usual.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            raise ConfigurationRefused(f"mailgate: {e} (twistd mailgate --help lists the options)") from None
        except BrokenPipeError:
            # twistd mailgate --help | head: the reader gone before the 24
            # KB of help were written.  Ended as a shell reports a command
            # killed by SIGPIPE, 141, rather than with Python's traceback;
            # parsed alone (mailgate serve), the command says so itself.
            if getattr(self, "parent", None) is None:
                raise
            _silenceStandardOutput()
            raise SystemExit(128 + 13) from None

    def opt_version(self):
        """
        Display mailgate's version, and Twisted's, and exit.
        """
        from twisted import copyright

        from mailgate import __version__

        print(f"mailgate {__version__} (Twisted {copyright.version})")
        raise SystemExit(0)

    def opt_config(self, path):
        if self.configPath is not None and path != self.configPath:
            # The first was dropped without a word; nor are files layered.
            raise usage.UsageError(
                f"--config given twice ({self.configPath}, then {path}): a server reads one configuration file"
            )
        self.configPath = path

    opt_config.__doc__ = (
        "A TOML configuration file whose keys are the long option names "
        '(database = "...", pop3 = ["tcp:110"], max-recipients = 100, ...).  '
        "Options given on the command line override it.  An unknown key, a "
        "wrong type or an invalid value stops start-up.  SIGHUP reads it "
        "again: debug-peer, debug-user and, while TLS stays on, the tls-* "
        "settings apply at once; greeting, idle-timeout, login-timeout, "
        "auth-failure-delay, pop3-client-workarounds, max-message-size, "
        "max-recipients, min-data-rate, "
        "smtp-idle-timeout, trusted-network, smtp-cleartext-network, "
        "lmtp-cleartext-network, proxy-network and xclient-network to sessions opened after it; "
        "max-connections, max-connections-per-ip, auth-penalty-max, ban-after, "
        "ban-window, ban-time, unknown-recipient-slow-after, "
        "unknown-recipient-ban-after, exempt-network and quota-status-max-connections to the connections and "
        "failures after it (bans in force stay); default-quota, quota-warning, "
        "expire-days, keep-deleted-days and duplicate-window to the next "
        "delivery and retention round; domain, postmaster, recipient-delimiter, "
        "delivered-to, quota-exceeded and spool-directory to the recipients and messages "
        "after it; quota-status-success, quota-status-nouser, quota-status-overquota and "
        "quota-status-toolarge to the quota-status answers after it; smtp-soft-error-limit and smtp-error-sleep-time to the SMTP "
        "error replies after it; login-delay, auth-cache-size and "
        "auth-cache-ttl to the logins after it; hostname to sessions opened "
        "after it; shutdown-grace to the next stop; memory-trim-interval and "
        "tls-ticket-key-rotation from it on; while OAuth stays on, the oauth2-* settings to the logins "
        "after it; other changes (OAuth turned on or off too) at the next restart (a changed database is "
        "refused, as an error).  Default: none."
    )

    def postOptions(self):
        try:
            self.config = configuration.resolveFile(
                self.configPath, self.given, os.environ, self.settings, self.configClass
            )
        except (configuration.ConfigFileError, configuration.EnvironmentValueError) as e:
            # One line, not twistd's usage text: the file, or the
            # environment the service was given (a unit's EnvironmentFile=),
            # is at fault, and trying again would find the same.
            raise ConfigurationRefused(f"mailgate: {e}") from None
        except ConfigurationError as e:
            raise usage.UsageError(str(e)) from None
        try:
            configuration.checkListening(self.config, self.configPath)
        except ConfigurationError as e:
            raise ConfigurationRefused(f"mailgate: {e}") from None
        for setting in self.settings:
            self[setting.name] = getattr(self.config, setting.attribute)

    def toConfig(self):
        """
        The configuration to serve, with SIGHUP handling on.
        """
        return attr.evolve(self.config, reloadOnSIGHUP=True)

    def reread(self):
        """
        The configuration as it is now: the file read again, the command
        line and the environment as at start (for SIGHUP).

        @raise ConfigurationError: the file cannot be read or is invalid.
        """
        config = configuration.resolveFile(self.configPath, self.given, os.environ, self.settings, self.configClass)
        configuration.checkListening(config, self.configPath)
        warning = self.overriddenWarning()
        if warning:
            _log.warn("{warning}", warning=warning, event="config.overridden")
        warning = self.masterUsersWarning()
        if warning:
            _log.warn("{warning}", warning=warning, event="config.master_users_on")
        # As at start: a file replaced since (mv of a file written under
        # the usual umask) may hand every user the database's password.
        warning = configFileWarning(self.configPath)
        if warning:
            _log.warn("{warning}", warning=warning, event="config.file_permissions")
        return attr.evolve(config, reloadOnSIGHUP=True)

    def masterUsersWarning(self):
        """
        L{configuration.masterUsersOnWarning} of the C{--config} file under
        this command line.
        """
        return configuration.masterUsersOnWarning(self.configPath, self.given, self.settings)

    def overriddenWarning(self):
        """
        What to warn of, if anything, in the keys of the C{--config} file
        that the command line gives another value: it wins, at start and
        at every reload, so the file's value is never served, and a change
        of it made for a reload did nothing, its reload saying "nothing to
        apply" (the systemd unit gives C{--log-format} on its command line).
        """
        if not self.configPath:
            return None
        try:
            values = configuration.readFile(self.configPath, self.settings)
        except ConfigurationError:
            return None
        names = [name for name, value in values.items() if name in self.given and self.given[name] != value]
        if not names:
            return None
        return (
            f"{', '.join(names)} in {self.configPath}: the command line gives "
            f"{'it' if len(names) == 1 else 'them'} another value, which wins; the file's is not served"
        )

    def commandLinePasswordWarning(self):
        """
        What to warn of, if anything, in a C{--database} given on the
        command line with the database's password in it: every user of
        the machine reads a process's command line (C{ps}) for as long as
        the server runs, as C{mailgate import pop3} refuses a password in
        its URL for.  Served all the same (the URL worked before, and may
        be a test's), but said at every start, as a configuration file
        others may read is.
        """
        database = self.given.get("database")
        if not database or not hasPassword(database):
            return None
        return (
            "--database on the command line gives the database's password, which every user of this "
            "machine can read in the process list (ps) while the server runs: set database in the --config "
            "file (chmod 640) or $MAILGATE_DATABASE instead, or leave the password out of the URL for "
            "libpq's password file (~/.pgpass)"
        )


_installHandlers(Options)


def raiseFileLimit():
    """
    Raise this process's soft limit on open files to its hard limit: every
    session is a file descriptor, and the usual soft limit of 1024 would cap
    a mail server at about a thousand concurrent sessions.

    @return: the new soft limit, or C{None} if it could not be read.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        return soft
    except (ImportError, ValueError, OSError):
        return None


def refuseCoreDumps():
    """
    Set this process's soft limit on core files to 0, leaving the hard
    limit as it is: the server holds what its database never keeps in
    clear (the passwords of USER/PASS, PLAIN and LOGIN while they are
    checked, the database URL's password), and a core file (a crash, or
    systemd's watchdog, whose SIGABRT dumps core) would write them to
    disk, next to the database or in systemd-coredump's store, and into
    the backups of either.  Root can let a process dump core again for
    debugging (C{prlimit --pid PID --core=unlimited}).

    @return: whether the limit is 0 now.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
        if soft != 0:
            resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
        return True
    except (ImportError, ValueError, OSError):
        return False


def makeService(options):
    """
    The service for C{twistd mailgate} (L{_makeTwistdService}), made with
    SIGHUP and SIGUSR1 held (L{HeldSignals}) until it handles them itself,
    in its privilegedStartService, and those that came taken once the
    reactor runs.  Their default action ended the process: in a start that
    upgrades the schema, for minutes, logrotate's SIGUSR1 (README: Logs)
    or a script's SIGHUP stopped the upgrade half done, and the start with
    it; and, held only while the service was made, in the interval twistd
    takes before starting it (its logger, its pid file, daemonizing).
    """
    held = HeldSignals((signal.SIGHUP, signal.SIGUSR1))
    try:
        service = _makeTwistdService(options)
    except BaseException:
        held.release()
        raise
    held.handOver(service)

    def taken():
        held.release()
        for signum in held.received:
            service.reactor.callWhenRunning(service.hangup if signum == signal.SIGHUP else service.reopenLogs)

    if not isinstance(getattr(options, "parent", None), usage.Options):
        # Not twistd's (which starts what it made): held while made only,
        # no handler left behind by a service nobody starts.
        taken()
        return service
    privilegedStart = service.privilegedStartService

    def privilegedStartService():
        try:
            return privilegedStart()
        finally:
            taken()

    service.privilegedStartService = privilegedStartService
    return service


def _makeTwistdService(options):
    """
    The service for C{twistd mailgate}.  Configuration errors, found now or
    when the listeners start, end the process with a one-line message.

    Under twistd, the service brings its own log observer (in the
    C{--log-format}, where twistd's options say, reopened on SIGHUP; see
    L{mailgate.logs}); run by systemd as a notify service (C{$NOTIFY_SOCKET}
    set), it tells systemd when it is ready and stopping
    (L{mailgate.systemd}).
    """
    parent = getattr(options, "parent", None)
    if parent is not None and parent.get("chroot"):
        # twistd changes root after this (the database opened, the
        # listeners bound) and before the reactor runs: the database's
        # connections, made then, looked for its file inside the new root
        # and failed, and so would every module not imported yet, while
        # the server listened and said nothing was wrong.
        raise _stopped(ConfigurationError(
            "twistd --chroot is not supported: mailgate opens its database and loads its code by "
            "paths outside the new root after twistd has changed it; run it with systemd's "
            "sandboxing (RootDirectory=, ProtectSystem=) or in a container instead"
        ))
    pidfile = parent.get("pidfile") if parent is not None else None
    if pidfile and os.path.islink(pidfile):
        # twistd writes the pid file after this, as root (before --uid),
        # through whatever is at the path: a dangling link put there had
        # root make any file of the machine.  Its own check before this
        # reads the file only where the link leads to one.
        raise _stopped(ConfigurationError(
            f"the pid file {pidfile} is a symbolic link: twistd would write it through the link, as root; "
            "remove it, and give --pidfile a file in a directory only root may write"
        ))
    raiseFileLimit()
    refuseCoreDumps()
    config = options.toConfig()
    movesDirectory = parent is not None and os.path.abspath(parent.get("rundir") or ".") != os.getcwd()
    if movesDirectory:
        relative = relativePaths(config, options.configPath)
        if relative:
            raise _stopped(ConfigurationError(_rundirRefusal(relative)))
    try:
        destination = logs.twistdDestination(parent) if parent is not None else None
    except OSError as e:
        raise _stopped(ConfigurationError(f"cannot open the log file {e.filename}: {e.strerror or e}")) from None
    if destination is None and parent is not None and config.logFormat != "text":
        raise _stopped(ConfigurationError(logFormatConflict(options, config, parent)))
    # twistd's reactor, installed by now: taken here, at the top, and
    # passed down like every other part.
    from twisted.internet import reactor

    if parent is not None:
        # The process is twistd's, its reactor mailgate's alone: its timers
        # run on the monotonic clock, which no step of the wall clock moves
        # (an embedder's reactor is left as it is).
        monotonicTimers(reactor)

    owner = twistdUser(parent)
    notifier = systemd.Notifier.fromEnvironment()
    try:
        made = _missingServerFiles(config.database) if owner is not None else []
        with _extendingTheStart(notifier):
            service = _makeService(config, reactor=reactor)
    except ConfigurationError as e:
        raise _stopped(e) from None
    if owner is not None:
        _giveTo(owner, made)
        try:
            with _effectively(owner):
                _checkUsable(service, config)
                unreadable = unreadableForReload(config, options.configPath)
        except ConfigurationError as e:
            raise _stopped(e) from None
        if unreadable:
            user = ownerName(owner[0])
            service.startupWarnings.append(("reload.unreadable", (
                f"{user}, the user of twistd's --uid, may not read {', '.join(unreadable)}: the start "
                f"read them as root, but a reload (SIGHUP, systemctl reload), made as {user}, cannot, "
                f"and a renewed certificate would not be served until a restart; let {user} read them "
                "(chgrp, chmod g+r)"
            )))
    warning = options.commandLinePasswordWarning()
    if warning:
        service.startupWarnings.append(("config.password_on_command_line", warning))
    if options.configPath:
        # SIGHUP reads the file again, under the same command line.
        service.configSource = options.reread
        if parent is not None:
            service.configSource = _rereadUnderTwistd(options, parent, movesDirectory, destination is None)
        warning = configFileWarning(options.configPath)
        if warning:
            service.startupWarnings.append(("config.file_permissions", warning))
        warning = options.overriddenWarning()
        if warning:
            service.startupWarnings.append(("config.overridden", warning))
        warning = options.masterUsersWarning()
        if warning:
            service.startupWarnings.append(("config.master_users_on", warning))
    service.exitOnStartupError = True
    service.ownsStopSignals = True
    # twistd's reactor is mailgate's own: skip the legacy log context per
    # event (see twistedcompat.leanEventDispatch).
    twistedcompat.leanEventDispatch(service.reactor)
    service.daemonized = parent is not None and not parent.get("nodaemon", False)
    if service.daemonized:
        try:
            service.startupErrors = os.fdopen(os.dup(2), "w")
        except OSError:
            pass
    # Python logging's records (psycopg's) into the same log, in its format.
    logs.forwardStandardLogging()
    if destination is not None:
        # Written on a thread of the observer's own: never the reactor's.
        service.logObserver = logs.observerFor(config.logFormat, destination, reactor=service.reactor)
        service.metrics.logStream(destination)
        if destination.path is not None:
            # Standard output (-n, as under systemd) has nothing to reopen:
            # a SIGHUP there says so rather than passing unremarked.
            service.onHangup(lambda: _reopenLog(destination))
    elif parent is not None and parent.get("syslog") and not parent.get("logger"):
        # twistd's --syslog, to the mail facility with each level's priority
        # (twistd's own observer logs to LOG_USER, warnings as info).
        reactor = service.reactor
        service.logObserver = logs.SyslogObserver(parent.get("prefix"), running=lambda: reactor.running)
        service.metrics.logStream(service.logObserver)
    if notifier is not None:
        watchdog = systemd.watchdogInterval()
        systemd.SystemdService(service, notifier, service.reactor, watchdog).setServiceParent(service)
    return service


def _extendingTheStart(notifier):
    """
    Under systemd, the context in which a schema upgrade at start extends
    the unit's start timeout (L{systemd.StartExtension}); elsewhere none.
    """
    if notifier is None:
        return contextlib.nullcontext()
    return observingUpgrades(functools.partial(systemd.StartExtension, notifier))


def _rundirRefusal(relative):
    """
    Why a start under twistd's C{--rundir} refuses the C{relative} paths
    (of L{relativePaths}).
    """
    return (
        f"twistd --rundir with relative paths ({'; '.join(relative)}): mailgate opens them "
        "before twistd changes directory and again after it, which would be two different "
        "files; give them as absolute paths"
    )


def _rereadUnderTwistd(options, parent, movesDirectory, twistdsOwnLog):
    """
    The configuration source of a reload under twistd: the file read
    again (L{Options.reread}), refused where the twistd options of the
    start make the next start refuse it, as it refuses it at start.  A
    reload took it (a relative C{tls-cert} was even applied at once, read
    from the directory twistd had changed to), and the next start exited
    78 on the same file.

    @param movesDirectory: twistd's C{--rundir} is not the directory the
        start was made in: a relative path is refused (L{relativePaths}).
    @param twistdsOwnLog: twistd keeps its own text log (C{--syslog},
        C{--logger}): another C{log-format} is refused
        (L{logFormatConflict}).
    """

    def reread():
        config = options.reread()
        relative = relativePaths(config, options.configPath) if movesDirectory else []
        if relative:
            raise ConfigurationError(_rundirRefusal(relative))
        if twistdsOwnLog and config.logFormat != "text":
            raise ConfigurationError(logFormatConflict(options, config, parent))
        return config

    return reread


def logFormatConflict(options, config, parent):
    """
    Why C{config}'s log format cannot be served with twistd's C{--syslog} or
    C{--logger}, which keep twistd's own observer (text): named where the
    value came from, the command line's C{--log-format} or the C{--config}
    file's C{log-format} key, so that the administrator edits the right
    place (the file's value was reported as C{--log-format}, an option not
    given).  A start refused for it exits 78: the same command line and
    file would be refused again.
    """
    twistdOption = "--syslog" if parent.get("syslog") else "--logger"
    if "log-format" in options.given or not options.configPath:
        source = f"--log-format {config.logFormat}"
        remedy = f"leave out --log-format or {twistdOption}"
    else:
        source = f'log-format = "{config.logFormat}" in {options.configPath}'
        remedy = f"remove the key from the file (or set it to \"text\"), or leave out {twistdOption}"
    return (
        f"{source} writes to a file or standard output, and twistd's {twistdOption} keeps its own "
        f"text log: {remedy}"
    )


def relativePaths(config, configPath=None):
    """
    The settings of C{config} (and the C{--config} file) that name a file
    or directory by a path relative to the working directory, as
    C{"--name PATH"}.
    """
    found = []
    if configPath and not os.path.isabs(configPath):
        found.append(f"--config {configPath}")
    prefix = "sqlite:///"
    if config.database.lower().startswith(prefix):
        path = config.database[len(prefix):]
        if path != ":memory:" and not os.path.isabs(path):
            found.append(f"--database {config.database}")
    for setting in configuration.SETTINGS:
        if setting.attribute in ("spoolDirectory", "tlsCertificate", "tlsKey", "tlsAltCertificate", "tlsAltKey"):
            values = [getattr(config, setting.attribute)]
        elif setting.attribute == "tlsNamedCertificates":
            values = [part for value in config.tlsNamedCertificates for part in configuration.splitCertificatePair(value)]
        elif setting.attribute == "oauth2Keys":
            values = list(config.oauth2Keys)
        else:
            continue
        found.extend(f"--{setting.name} {value}" for value in values if value and not os.path.isabs(value))
    return found


def twistdUser(parent):
    """
    The C{(uid, gid)} twistd switches to once the listeners are bound
    (C{--uid}, C{--gid}; C{-1}: the group stays), when it runs as root and
    will; otherwise C{None}.

    Without C{--gid}, twistd takes the user's own group (its passwd
    entry's), not root's: the start's checks were made as root's group
    (and files given to it), so a database directory writable through
    the user's group was refused at start, exit 78, where the server would
    have worked, and one writable through root's group passed, where it
    would not.
    """
    if parent is None or os.geteuid() != 0:
        return None
    uid, gid = parent.get("uid"), parent.get("gid")
    if not uid:
        return None
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = -1
    return uid, gid


def _missingServerFiles(database):
    """
    The files of an SQLite C{database} that the start-up makes, as root,
    before twistd's C{--uid} takes effect (the database, its C{-wal} and
    C{-shm}, the server's C{.lock}), of those not there yet.
    """
    from mailgate.store import engineFromURL

    engine = engineFromURL(database)
    path = getattr(engine, "path", None)
    if not path or engine.ephemeral:
        return []
    path = os.path.abspath(path)
    return [name for name in (path, path + "-wal", path + "-shm", path + ".lock") if not os.path.lexists(name)]


def _giveTo(owner, names):
    """
    Give the files of C{names} that this start made, as root, to the user
    twistd's C{--uid} runs the server as: a new SQLite database was made
    root's, mode 0600, and the server, once it ran as that user, could not
    open it (every session and background task failed, with tracebacks in
    the log).  Only a regular file of root's with one link, never through
    a symbolic link.
    """
    uid, gid = owner
    for name in names:
        try:
            found = os.lstat(name)
            if stat.S_ISREG(found.st_mode) and found.st_uid == 0 and found.st_nlink == 1:
                os.chown(name, uid, gid, follow_symlinks=False)
        except OSError:
            continue


@contextlib.contextmanager
def _effectively(owner):
    """
    Act as the user and groups twistd's C{--uid} and C{--gid} switch to
    (as its C{initgroups}, C{setgid}, C{setuid} will), for the time of the
    block: root's checks at start pass whatever the permissions.
    """
    uid, gid = owner
    savedGroups, savedGID = os.getgroups(), os.getegid()
    newGID = savedGID if gid == -1 else gid
    try:
        groups = os.getgrouplist(pwd.getpwuid(uid).pw_name, newGID)
    except KeyError:
        groups = [newGID]
    os.setgroups(groups)
    os.setegid(newGID)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(savedGID)
        os.setgroups(savedGroups)


def _checkUsable(service, config):
    """
    What the server will need once it runs as C{--uid}'s user: to make
    files in the spool directory, and to open an SQLite database (and
    make its C{-wal} and C{-shm} beside it).  Checked as root, at start,
    both passed, and then every message too large for memory was refused
    with 452 and every database access failed.

    @raise ConfigurationError: what the user cannot do, and why.
    """
    user = ownerName(os.geteuid())
    try:
        checkedSpoolDirectory(config)
        engine = getattr(service.store, "engine", None)
        if getattr(engine, "path", None) and not engine.ephemeral:
            # Refused before SQLite opens it read-only, making its -wal
            # and -shm as the file is (0400): they outlived a chmod 600.
            engine.refuseReadOnly()
            engine.connect().close()
    except Exception as e:
        raise ConfigurationError(f"{e} (as {user}, the user of twistd's --uid)") from None


def unreadableForReload(config, configPath=None):
    """
    The files a reload reads (the C{--config} file, the TLS certificates
    and keys, the oauth2-keys files) that this process cannot read, as
    C{"--name PATH"}: run as C{--uid}'s user (L{_effectively}), those
    twistd read at start as root and a SIGHUP, by then that user's, reads
    again.
    """
    named = [("config", configPath)]
    for setting in configuration.SETTINGS:
        if setting.attribute in ("tlsCertificate", "tlsKey", "tlsAltCertificate", "tlsAltKey"):
            named.append((setting.name, getattr(config, setting.attribute)))
        elif setting.attribute == "tlsNamedCertificates":
            named += [
                (setting.name, part)
                for value in config.tlsNamedCertificates
                for part in configuration.splitCertificatePair(value)
            ]
        elif setting.attribute == "oauth2Keys":
            named += [(setting.name, path) for path in config.oauth2Keys]
    unreadable = []
    for name, path in named:
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError:
            unreadable.append(f"--{name} {path}")
    return unreadable


def configFileWarning(path):
    """
    What to warn of, if anything, in the permissions of a configuration
    file that gives the database's password: every user of the machine
    may read it.  Written under the usual umask (0644), as an editor
    leaves it, it hands them the database, every message and password
    hash in it.  Left as it is, but said at every start, as of a TLS key.
    So is a file every user may write or replace
    (L{mailgate.config.writableByOthers}), or another user owns
    (L{mailgate.config.ownedByOthers}).
    """
    try:
        database = configuration.readFile(path).get("database")
        permissions = stat.S_IMODE(os.stat(path).st_mode)
    except (ConfigurationError, OSError):
        return None
    warnings = [configuration.writableByOthers(path), configuration.ownedByOthers(path)]
    if database is not None and hasPassword(database) and permissions & 0o004:
        warnings.insert(0, (
            f"the configuration file {path} holds the database's password, and every user of this "
            f"machine may read it (mode {permissions:04o}): chmod o-r it"
        ))
    return "; ".join(filter(None, warnings)) or None


class ConfigurationRefused(SystemExit):
    """
    A configuration file that cannot be served: the process ends with
    C{EX_CONFIG} (78), as for every other configuration to correct before a
    start can work, so that under systemd the unit's
    C{RestartPreventExitStatus=78} leaves the service failed, its reason in
    the journal, rather than start it again and again on the same file (a
    message as C{SystemExit}'s code would exit 1, which
    C{Restart=on-failure} retries).  The one line is written to standard
    error as it is raised (an error where that is systemd's journal:
    L{logs.writeStartFailure}), and is the exception's text.
    """

    def __init__(self, message):
        super().__init__(os.EX_CONFIG)
        self.message = message
        logs.writeStartFailure(sys.stderr, message)

    def __str__(self):
        return self.message


def _stopped(error):
    """
    End start-up on C{error} in one line on standard error, with the status
    of sysexits(3) a supervisor acts on: C{EX_TEMPFAIL} (75) when the
    database cannot be reached for now, so that it starts mailgate again
    (systemd's C{Restart=on-failure}), C{EX_CONFIG} (78) when the
    configuration must change first (a wrong database password, an unknown
    database, a TLS key that cannot be read): the unit's
    C{RestartPreventExitStatus=78} stops retrying then.

    Where standard error is systemd's journal, the line is an error there
    (L{logs.writeStartFailure}).
    """
    logs.writeStartFailure(sys.stderr, f"mailgate: {error}")
    return SystemExit(os.EX_TEMPFAIL if isinstance(error, UnavailableAtStart) else os.EX_CONFIG)


def _reopenLog(destination):
    """
    Reopen the log file (SIGHUP, SIGUSR1); C{False} if it could not be
    (logged here, as C{log.reopen_failed}), which makes a SIGHUP's reload
    one that failed (C{mailgate_config_last_reload_successful} 0, and
    systemd's status says so): lines go on to the old file, which
    logrotate will compress or remove.
    """
    try:
        reopened = destination.reopen()
    except OSError as e:
        # The old file stays in use (nothing is lost); say which and why.
        _log.error(
            "log file not reopened, still writing to the old one: {path}: {error}",
            path=destination.path,
            error=e.strerror or e,
            event="log.reopen_failed",
        )
        return False
    if reopened:
        _log.info("log file reopened: {path}", path=destination.path, event="log.reopened")
