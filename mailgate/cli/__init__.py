# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate}: the administrator's command.

  mailgate [--database URL | --config FILE] user add ADDRESS [--password-stdin] [--apop] [--hashed]
  mailgate user passwd ADDRESS [--password-stdin] [--hashed]
  mailgate user import PASSWD-FILE [--domain DOMAIN] [--scheme SCHEME] [--apop] [--refresh]
  mailgate user test ADDRESS [--password-stdin]
  mailgate user del ADDRESS
  mailgate user list [--json]
  mailgate user apop ADDRESS on|off [--password-stdin]
  mailgate user quota ADDRESS SIZE|none|default [--messages N|none|default]
  mailgate user expire ADDRESS N|never|default
  mailgate user rename OLD NEW
  mailgate user recount (ADDRESS... | --all)
  mailgate mailbox list ADDRESS [--json]
  mailgate mailbox expunge ADDRESS (--older-than DAYS | --all)
  mailgate mailbox deleted ADDRESS [--json]
  mailgate mailbox restore ADDRESS [UIDL ...] [--since TIME] [--as-new]
  mailgate mailbox show ADDRESS MESSAGE
  mailgate mailbox export (ADDRESS DIR | --all DIR)
  mailgate import forget ADDRESS [UIDL ...]
  mailgate import maildir DIR ADDRESS [--uidl-format FORMAT] [--uidlist FILE] [--reuse-xuidl]
                          [--deleted-flag KEYWORD] [--mirror] [--max-message-size SIZE]
  mailgate import pop3 URL [ADDRESS] [--password-stdin] [--insecure] [--delete | --mirror] [--users FILE]
                       [--max-message-size SIZE] [--master-user NAME [--master-separator SEP]]
  mailgate who [--json]
  mailgate nodes [--json]
  mailgate kick ADDRESS [--wait SECONDS]
  mailgate deliver [-f SENDER] [--again] ADDRESS... < message
  mailgate db upgrade
  mailgate db version
  mailgate db copy --from URL --to URL
  mailgate db backup FILE
  mailgate db restored
  mailgate config [--all | --check]
  mailgate serve [options of twistd mailgate]
  mailgate ban list [--json]
  mailgate ban add ADDRESS [--for SECONDS]
  mailgate ban del ADDRESS
  mailgate alias add ALIAS ADDRESS
  mailgate alias del ALIAS
  mailgate alias list [ADDRESS] [--json | --virtual]
  mailgate alias import VIRTUAL-FILE [--dry-run]
  mailgate master add NAME [--password-stdin] [--hashed] [--networks NETWORKS]
  mailgate master passwd NAME [--password-stdin] [--hashed]
  mailgate master networks NAME NETWORKS|any
  mailgate master del NAME
  mailgate master list [--json]

It works on the database directly and synchronously (no reactor), through
the same store code the server uses, so it is safe to run while the server
is up.  C{mailgate serve} is the exception: it runs the server itself, in
the foreground, as C{twistd -n mailgate} would.  Exit codes follow sysexits(3), which is what an MTA's pipe transport
understands for C{deliver}: 0 delivered, 67 unknown user, 75 try again.
"""

import argparse
import contextlib
import io
import os
import select
import sys

from mailgate import __version__
from mailgate.cli import audit
from mailgate.cli.aliases import _addAliasCommands
from mailgate.cli.bans import _addBanCommands
from mailgate.cli.common import (
    CommandError,
    EXIT_READER_GONE,
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_IOERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_NOUSER,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    Output,
    OutputFailed,
    _shown,
)
from mailgate.cli.database import _addDatabaseCommands
from mailgate.cli.deliver import _addDeliverCommand, _deliver
from mailgate.cli.imports import _addImportCommands
from mailgate.cli.mailboxes import _addMailboxCommands
from mailgate.cli.masterusers import _addMasterUserCommands
from mailgate.cli.serve import _serve
from mailgate.cli.sessions import _addSessionCommands
from mailgate.cli.users import _addUserCommands
from mailgate.errors import (
    ConfigurationError,
    DatabaseDamaged,
    DatabaseInUse,
    DatabaseRefused,
    MailgateError,
    NoSuchUser,
    TemporaryFailure,
)
from mailgate.store import DEFAULT_DATABASE, NoSuchDatabase, openSynchronousStore

#: what this package offers: the command, its parser, and the exit codes
#: (sysexits(3)) scripts and tests compare with
__all__ = [
    "buildParser",
    "main",
    "run",
    "EXIT_READER_GONE",
    "EX_CANTCREAT",
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_IOERR",
    "EX_NOINPUT",
    "EX_NOPERM",
    "EX_NOUSER",
    "EX_OK",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
]


class _OneConfig(argparse.Action):
    """
    C{--config FILE}, given once (or the same path again): a second,
    different file is noted, for L{run} to refuse as C{twistd mailgate}
    does (L{mailgate.tap.Options.opt_config}).  argparse kept the last
    one, unsaid: C{--config base.toml --config local.toml}, files layered
    as other daemons layer them, worked on local.toml's database alone.
    """

    def __call__(self, parser, namespace, value, option_string=None):
        first = getattr(namespace, self.dest, None)
        if first is not None and value != first and getattr(namespace, "configTwice", None) is None:
            namespace.configTwice = (first, value)
        setattr(namespace, self.dest, value if first is None else first)


class _Parser(argparse.ArgumentParser):
    """
    A parser whose commands take their options among their operands, as
    GNU's commands do: C{mailgate mailbox restore ADDRESS --as-new UIDL}.
    argparse's own parse fills a list of operands only up to the first
    option, and the operands after it were refused as "unrecognized
    arguments" (exit 64), though the same words in another order worked.
    The parser of a group of commands (its subcommands), and one whose
    operands exclude an option (C{mailbox export}'s C{ADDRESS DIR |
    --all DIR}), parse as argparse does.  Every subcommand's parser is
    one of these (argparse makes them of the class of their parent's).
    """

    _intermixing = False

    def add_argument(self, *args, **kwargs):
        # A list of operands that may be empty (nargs="*") is a required
        # argument in argparse's eyes unless it has a default: parsed
        # intermixed, a command missing its ADDRESS was told "the
        # following arguments are required: ADDRESS, UIDL".
        if args and not args[0].startswith(self.prefix_chars) and kwargs.get("nargs") == "*":
            kwargs.setdefault("default", [])
        return super().add_argument(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing or not self._mayIntermix():
            return super().parse_known_args(args, namespace)
        # argparse's intermixed parse calls this method twice (options,
        # then operands): those calls parse as argparse does.
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def _mayIntermix(self):
        """
        Whether argparse's intermixed parse takes this parser's operands
        (it refuses subcommands, a remainder and operands in a mutually
        exclusive group).
        """
        positionals = self._get_positional_actions()
        if any(action.nargs in (argparse.PARSER, argparse.REMAINDER) for action in positionals):
            return False
        return not any(
            action in positionals for group in self._mutually_exclusive_groups for action in group._group_actions
        )


def buildParser():
    parser = _Parser(
        prog="mailgate",
        description="Administer a mailgate database: users, maildrops, local delivery.",
    )
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    parser.add_argument(
        "--database",
        metavar="URL",
        help="database URL (default: the --config file's database, else $MAILGATE_DATABASE, "
        "else " + DEFAULT_DATABASE + ")",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        action=_OneConfig,
        help="the server's configuration file (twistd mailgate --config FILE): its database is "
        "used, so the URL and its password need not be repeated; the file is checked as the "
        "server checks it",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    _addUserCommands(commands)
    _addMailboxCommands(commands)
    _addSessionCommands(commands)
    _addImportCommands(commands)
    _addDeliverCommand(commands)
    _addDatabaseCommands(commands)

    showConfig = commands.add_parser(
        "config",
        help="show the configuration a server would serve (the settings not at their defaults)",
        description="Print the configuration twistd mailgate serves with --config FILE (the "
        "global --config) and no other option: the settings not at their defaults, as a "
        "configuration file (as postconf -n and doveconf -n), the database's password hidden; "
        "--all prints every setting.",
    )
    # One or the other (README: config [--all | --check]): --check prints
    # no settings, so --all beside it was silently ignored.
    showing = showConfig.add_mutually_exclusive_group()
    showing.add_argument("--all", action="store_true", help="every setting, at its default or not")
    showing.add_argument(
        "--check",
        action="store_true",
        help="check the configuration as a server starting or reloading would (values, TLS "
        "certificates and keys loaded), print what is wrong and exit 78, or 'configuration OK' "
        "(as nginx -t; the systemd unit's ExecReload runs it before the SIGHUP)",
    )
    showConfig.set_defaults(run=_showConfig, migrate=False, store=False)

    # Its options are twistd mailgate's, parsed by mailgate.tap: passed on as
    # they are (see run).
    commands.add_parser(
        "serve",
        add_help=False,
        help="run the server in the foreground, with the options of twistd mailgate "
        "(mailgate serve --help lists them)",
    ).set_defaults(run=None)
    _addBanCommands(commands)
    _addAliasCommands(commands)
    _addMasterUserCommands(commands)
    return parser


def _configDatabase(path):
    """
    The database URL the server's configuration file at C{path} sets, or
    C{None} (no file given, or no database in it).  The whole file is read
    and checked as C{twistd mailgate --config} reads it, so a file the
    server would refuse is refused here too, in the same words.

    @raise ConfigurationError: the file cannot be used.
    """
    if path is None:
        return None
    from mailgate import config

    return config.readFile(path).get("database")


def _showConfig(store, args, out, stdin):
    from mailgate import config

    served = config.resolveFile(args.config, {}, args.environ)
    source = f"--config {args.config}" if args.config is not None else "no configuration file"
    if args.check:
        _checkServed(served, args, out)
        return
    out.write(f"# what twistd mailgate serves with {source} and no other option\n")
    out.write(config.effectiveFile(served, everything=args.all))


def _checkServed(served, args, out):
    """
    What C{config --check} does: build what a server starting with this
    configuration builds before it binds or opens the database (the
    checks across settings, the TLS contexts from the certificate and key
    files, the CPU affinity), so that C{systemctl reload} refuses a file
    or a certificate the server would refuse, saying why, instead of
    sending a SIGHUP whose failure only the log would tell.  What a
    server would warn of at start (a certificate expiring, a key or
    configuration file others may read) is written to standard error.

    @raise ConfigurationError: what the server would refuse.
    """
    from mailgate import config, service, tap

    config.checkConfig(served)
    config.checkListening(served, args.config)
    tls = service.checkStartable(served)
    warnings = [] if tls is None else [*tls.expiryWarnings(), *tls.keyWarnings, *tls.chainWarnings]
    if args.config is not None:
        warnings.append(tap.configFileWarning(args.config))
        warnings.append(config.masterUsersOnWarning(args.config))
    tokens = service.makeTokenValidator(served)
    if tokens is not None:
        warnings += tokens.keyWarnings
    warnings += config.openSockets(served)
    # Warned of, not refused: the server may be stopped, and the unit's
    # RuntimeDirectory= with it, which systemd makes again at its start.
    warnings += [
        f"{name} {description}: {reason}: a start cannot listen there unless it is made first "
        "(for /run/mailgate, the unit's RuntimeDirectory= makes it at each start)"
        for name, description, reason in config.missingSocketDirectories(served)
    ]
    from mailgate.listenercheck import foreignInterfaces

    warnings += [
        f"{name} {description}: {reason}: a start could not listen there (exit 1, which systemd retries)"
        for name, description, reason in foreignInterfaces(served)
    ]
    for warning in filter(None, warnings):
        args.stderr.write(f"mailgate: warning: {warning}\n")
    where = args.config if args.config is not None else "no configuration file"
    out.write(f"mailgate: {where}: configuration OK\n")


def _configValues(path):
    """
    What the server's configuration file at C{path} sets, by long option
    name (read and checked as the server reads it).
    """
    from mailgate import config

    return config.readFile(path)


def _configLimits(values):
    """
    The store's defaults as the server's configuration file sets them
    (C{values}, what L{_configValues} read: C{--default-quota},
    C{--quota-warning}, the retention days), so that C{mailgate deliver
    --config FILE}, an MTA's pipe transport, applies the quota the
    server's SMTP and LMTP apply.
    """
    from mailgate.store.limits import DUPLICATE_WINDOW, StoreLimits

    return StoreLimits(
        quotaOctets=values.get("default-quota"),
        expireDays=values.get("expire-days"),
        keepDeletedDays=values.get("keep-deleted-days", 0),
        quotaWarnings=values.get("quota-warning", ()),
        duplicateWindow=values.get("duplicate-window", DUPLICATE_WINDOW),
    )


def _databaseURL(args, environ):
    """
    The database URL to work on, and where it came from, for messages
    about it: C{--database}, else the C{--config} file's, else
    C{$MAILGATE_DATABASE}, else the default, as for the server.
    """
    if args.database:
        return args.database, "--database"
    fromFile = _configDatabase(args.config)
    if fromFile:
        return fromFile, f"database in {args.config}"
    if environ.get("MAILGATE_DATABASE"):
        return environ["MAILGATE_DATABASE"], "$MAILGATE_DATABASE"
    # A --config file that sets no database is named: an MTA's pipe
    # transport given the server's file, whose database the systemd unit
    # sets in its environment instead, defers every message with this line.
    inFile = f", nor database in {args.config}" if args.config else ""
    return DEFAULT_DATABASE, (
        f"--database: none was given{inFile}, nor $MAILGATE_DATABASE, and the default, {DEFAULT_DATABASE}, "
        "is in the working directory"
    )


def run(argv, stdin=None, stdout=None, stderr=None, environ=None):
    """
    Run the command; return its exit code.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    if stderr is None:
        # Python's standard error where the command started with it closed
        # (2>&-): its messages go nowhere, and the exit status still says
        # what happened (writing them failed, and every failure exited 1).
        stderr = io.StringIO()
    environ = os.environ if environ is None else environ
    parser = buildParser()
    try:
        # argparse writes help and usage errors to sys.stdout/sys.stderr;
        # send them to the streams this run was given.
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args, rest = parser.parse_known_args(argv)
            if args.command != "serve":
                args = parser.parse_args(argv)
    except SystemExit as e:
        return EX_USAGE if e.code else EX_OK
    except BrokenPipeError:
        # mailgate user --help | head: the reader gone, as for a listing.
        if _readerGone(stdout):
            return EXIT_READER_GONE
        raise
    if getattr(args, "configTwice", None) is not None:
        first, second = args.configTwice
        stderr.write(
            f"mailgate: {_shown(f'--config given twice ({first}, then {second})')}: the command reads one "
            "configuration file (mailgate --help lists the options)\n"
        )
        return EX_USAGE
    if args.command == "serve":
        if args.config is not None:
            # Before serve's own options, so that a --config of its own wins.
            rest = ["--config", args.config, *rest]
        try:
            return _serve(rest, args.database, stdout, stderr)
        except BrokenPipeError:
            # mailgate serve --help | head (its options, 24 KB of them).
            if _readerGone(stdout):
                return EXIT_READER_GONE
            raise
    delivering = args.run is _deliver
    try:
        url, source = _databaseURL(args, environ)
    except ConfigurationError as e:
        stderr.write(f"mailgate: {_shown(str(e))}\n")
        return EX_TEMPFAIL if delivering else EX_CONFIG
    store = None
    opening = False

    def failed(message, code):
        # The command's one line on standard error, and in its audit
        # line where it had started (mailgate.cli.audit).  One line
        # whatever it quotes: a path or URL as given (a line break in it
        # started a line of its own), anything unprintable as ?.
        stderr.write(f"mailgate: {_shown(message)}\n")
        audit.finish(args, code, message)
        return code

    try:
        args.stdin = stdin
        args.stderr = stderr
        args.environ = environ
        args.databaseURL = url
        # A command's option values are read before anything is opened: a
        # bad one is a usage error (64), not hidden behind a database that
        # is missing (78) or slow to answer.
        readOptions = getattr(args, "readOptions", None)
        if readOptions is not None:
            readOptions(args)
        if getattr(args, "store", True):
            # Only the commands that start a database from nothing create
            # its file: any other one on a mistyped path would make an
            # empty database and report no users.
            opening = True
            # A command that only reads takes a PostgreSQL standby where
            # the URL names one (README, Scaling out: a primary and its standbys).
            store = openSynchronousStore(
                url, migrate=args.migrate, create=getattr(args, "create", False),
                readsOnly=getattr(args, "readsOnly", False), readFirst=getattr(args, "readFirst", False),
            )
            opening = False
            audit.upgraded(args, getattr(store, "migrationsApplied", ()))
            if args.config is not None:
                values = _configValues(args.config)
                store.limits = _configLimits(values)
                # Recipients are found as the server's LMTP finds them
                # (deliver: postmaster@, details, the accepted domains).
                args.recipientDelimiter = values.get("recipient-delimiter")
                # Whether each recipient's copy names it (deliver --sender).
                args.deliveredTo = values.get("delivered-to")
                args.postmaster = values.get("postmaster")
                args.domains = values.get("domain")
                # How the server refuses a full mailbox (deliver's exit 77
                # for "permanent", 75 else).
                args.quotaExceeded = values.get("quota-exceeded")
                # The name the server's Received: fields give (deliver's too).
                args.hostname = values.get("hostname")
                args.spoolDirectory = values.get("spool-directory")
                # The largest message the server's SMTP and LMTP take
                # (deliver refuses a larger one, exit 65).
                from mailgate.config import setting

                args.maxMessageSize = values.get("max-message-size", setting("max-message-size").default)
        output = Output(stdout)
        audit.started(args)
        args.run(store, args, output, stdin)
        # Here rather than at exit, so that a reader gone is seen below.
        output.flush()
        audit.finish(args, EX_OK)
        return EX_OK
    except CommandError as e:
        return failed(str(e), e.code)
    except OutputFailed as e:
        if delivering:
            # deliver writes only once the message is stored: 75 would
            # have the MTA store it again.
            stderr.write(f"mailgate: the message is stored, but {e}\n")
            audit.finish(args, EX_OK)
            return EX_OK
        return failed(str(e), EX_IOERR)
    except NoSuchDatabase as e:
        code = EX_TEMPFAIL if delivering else EX_CONFIG
        return failed(f"{e} (check {source}; mailgate user add or db upgrade creates it)", code)
    except DatabaseRefused as e:
        # PostgreSQL refused the URL's password, role or database: trying
        # again changes nothing (deliver's MTA keeps the message all the
        # same).
        return failed(str(e), EX_TEMPFAIL if delivering else EX_CONFIG)
    except DatabaseDamaged as e:
        # No retry repairs it: a restore does (deliver's MTA keeps the
        # message meanwhile).
        return failed(str(e), EX_TEMPFAIL if delivering else EX_CONFIG)
    except TemporaryFailure as e:
        return failed(f"temporary failure, try again: {e}", EX_TEMPFAIL)
    except DatabaseInUse as e:
        # A server of an older mailgate runs on the SQLite file the command
        # would migrate: once it restarts (or stops), the command works.
        return failed(str(e), EX_TEMPFAIL)
    except ConfigurationError as e:
        # A database that cannot be opened: say whose URL it was.  Not of
        # another error (config --check's TLS files, which opens none):
        # "database in FILE: tls-ciphers ..." blamed the database.
        where = f"{source}: " if opening and not source.startswith("--database") else ""
        return failed(f"{where}{e}", EX_TEMPFAIL if delivering else EX_CONFIG)
    except NoSuchUser as e:
        # Gone while a paged listing of hers was printed (mailbox list,
        # deleted, export): its later pages are read as it goes.
        return failed(f"no such user: {e}", EX_TEMPFAIL if delivering else EX_NOUSER)
    except MailgateError as e:
        return failed(str(e), EX_TEMPFAIL if delivering else EX_SOFTWARE)
    except KeyboardInterrupt:
        return failed("interrupted", 130)
    except Exception as e:
        if isinstance(e, BrokenPipeError) and _readerGone(stdout):
            # mailgate mailbox list ... | head: nothing failed.  deliver
            # writes only once the message is stored: a retry would store
            # it twice.
            code = EX_OK if delivering else EXIT_READER_GONE
            audit.finish(args, code, None if code == EX_OK else "standard output's reader went away")
            return code
        from mailgate.store.sqlite import damageOf

        damage = damageOf(e)
        if damage is not None:
            # Found past the opening (a damaged page read later).
            return failed(str(damage), EX_TEMPFAIL if delivering else EX_CONFIG)
        return failed(f"internal error: {e.__class__.__name__}: {e}", EX_TEMPFAIL if delivering else EX_SOFTWARE)
    finally:
        if store is not None:
            store.close()


def _readerGone(stream):
    """
    Whether C{stream} is a pipe (or socket) that nothing reads any more,
    rather than some other part of the command having met a broken pipe.
    (Asked of the descriptor: what failed to be written may be gone from
    the stream's buffer, so flushing it again can succeed.)
    """
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except Exception:
        return False
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in events)


def main():
    status = run(sys.argv[1:])
    if _readerGone(sys.stdout):
        # The interpreter flushes standard output once more on exit, and
        # would report the broken pipe as an exception ignored.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(status)
