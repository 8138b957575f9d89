# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate}: the administrator's command.

  mailgate [--database URL] user add ADDRESS [--password-stdin] [--apop]
  mailgate user passwd ADDRESS [--password-stdin]
  mailgate user del ADDRESS
  mailgate user list
  mailgate user apop ADDRESS on|off [--password-stdin]
  mailgate mailbox list ADDRESS
  mailgate deliver ADDRESS... < message
  mailgate db upgrade
  mailgate serve [options of twistd mailgate]
  mailgate ban list
  mailgate ban add ADDRESS [--for SECONDS]
  mailgate ban del ADDRESS

It works on the database directly and synchronously (no reactor), through
the same store code the server uses, so it is safe to run while the server
is up.  C{mailgate serve} is the exception: it runs the server itself, in
the foreground, as C{twistd -n mailgate} would.  Exit codes follow sysexits(3), which is what an MTA's pipe transport
understands for C{deliver}: 0 delivered, 67 unknown user, 75 try again.
"""

import argparse
import contextlib
import datetime
import getpass
import os
import sys

from mailgate import __version__
from mailgate.address import normalizeAddress
from mailgate.auth.passwords import StoredCredentials, makeCredentials, verifyPassword
from mailgate.errors import (
    ConfigurationError,
    InvalidAddress,
    MailgateError,
    NoSuchUser,
    TemporaryFailure,
    UserExists,
)
from mailgate.message import spoolFile
from mailgate.store import DEFAULT_DATABASE, openSynchronousStore
from mailgate.store.schema import LATEST, currentVersion, upgrade

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78


class CommandError(Exception):
    """
    A failure to report in one line, with its exit code.
    """

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def _result(d):
    """
    The result of an already-fired L{Deferred} from a synchronous store.
    """
    box = []
    d.addBoth(box.append)
    if not box:
        raise RuntimeError("store returned an unfired Deferred")
    value = box[0]
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


def _address(text):
    try:
        return normalizeAddress(text)
    except InvalidAddress as e:
        raise CommandError(str(e), EX_DATAERR)


def _readPassword(args, stdin, confirm=True):
    """
    The password: one line from standard input with C{--password-stdin},
    else asked for twice on the terminal.
    """
    if args.password_stdin:
        line = stdin.readline()
        password = line.rstrip("\r\n")
    else:
        if not (hasattr(stdin, "isatty") and stdin.isatty()):
            raise CommandError(
                "no terminal to ask for a password on; use --password-stdin", EX_USAGE
            )
        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Again: ") != password:
            raise CommandError("the passwords differ", EX_DATAERR)
    if not password:
        raise CommandError("empty password", EX_DATAERR)
    if "\0" in password:
        raise CommandError("the password contains a NUL character", EX_DATAERR)
    return password


def _userAdd(store, args, out, stdin):
    address = _address(args.address)
    password = _readPassword(args, stdin)
    try:
        _result(store.addUser(address, makeCredentials(password, apop=args.apop)))
    except UserExists:
        raise CommandError(f"user {address} already exists", EX_CANTCREAT)
    out.write(f"added {address}{' (APOP enabled)' if args.apop else ''}\n")


def _existingUser(store, address):
    user = _result(store.findUser(address))
    if user is None:
        raise CommandError(f"no such user: {address}", EX_NOUSER)
    return user


def _userPasswd(store, args, out, stdin):
    address = _address(args.address)
    user = _existingUser(store, address)
    password = _readPassword(args, stdin)
    credentials = makeCredentials(password, apop=user.apopSecret is not None)
    _result(store.setCredentials(address, credentials))
    out.write(f"password changed for {address}\n")


def _userDel(store, args, out, stdin):
    address = _address(args.address)
    try:
        _result(store.deleteUser(address))
    except NoSuchUser:
        raise CommandError(f"no such user: {address}", EX_NOUSER)
    out.write(f"deleted {address} and their maildrop\n")


def _userList(store, args, out, stdin):
    users = _result(store.listUsers())
    out.write(f"{'ADDRESS':<40} {'MESSAGES':>8} {'OCTETS':>12}  APOP\n")
    for user in users:
        out.write(
            f"{user.address:<40} {user.messages:>8} {user.octets:>12}  "
            f"{'on' if user.apop else 'off'}\n"
        )


def _userApop(store, args, out, stdin):
    address = _address(args.address)
    user = _existingUser(store, address)
    if args.state == "off":
        credentials = StoredCredentials(user.passwordHash, user.scramSha256, None)
        _result(store.setCredentials(address, credentials))
        out.write(f"APOP disabled for {address}; its stored secret is erased\n")
        return
    # The database holds only a hash, so APOP needs the password once more:
    # it must be the user's current password.
    password = _readPassword(args, stdin, confirm=False)
    if not verifyPassword(password.encode("utf-8"), user.passwordHash):
        raise CommandError(f"that is not the current password of {address}", EX_DATAERR)
    credentials = StoredCredentials(user.passwordHash, user.scramSha256, password)
    _result(store.setCredentials(address, credentials))
    out.write(f"APOP enabled for {address}\n")


def _mailboxList(store, args, out, stdin):
    address = _address(args.address)
    try:
        messages = _result(store.listMessages(address))
    except NoSuchUser:
        raise CommandError(f"no such user: {address}", EX_NOUSER)
    out.write(f"{'NUMBER':>6} {'OCTETS':>10}  {'UNIQUE-ID':<20} ARRIVED\n")
    for message in messages:
        arrived = datetime.datetime.fromtimestamp(message.arrived, datetime.timezone.utc)
        out.write(
            f"{message.number:>6} {message.size:>10}  {message.uniqueId:<20} "
            f"{arrived.strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
        )


def _deliver(store, args, out, stdin):
    addresses = []
    for text in args.addresses:
        try:
            addresses.append(normalizeAddress(text))
        except InvalidAddress as e:
            raise CommandError(str(e), EX_NOUSER)
    # All or nothing: an unknown recipient fails the delivery before any copy
    # is stored, so the MTA's bounce tells the whole truth.
    for address in addresses:
        _existingUser(store, address)
    trace = ()
    if args.sender is not None:
        # Like the final delivery of SMTP and LMTP: where the message came
        # from, and that mailgate stored it.
        import socket

        from mailgate.smtp.envelope import Envelope, traceHeaders

        envelope = Envelope(helo=None, peer=None, protocol="local", sender=args.sender, recipients=addresses)
        trace = traceHeaders(envelope, socket.getfqdn())
    source = spoolFile(getattr(stdin, "buffer", stdin), headerLines=trace)
    try:
        results = _result(store.deliver(addresses, source))
    finally:
        source.close()
    missing = [a for a, r in results.items() if isinstance(r, NoSuchUser)]
    for address, uniqueId in results.items():
        if not isinstance(uniqueId, NoSuchUser):
            out.write(f"delivered to {address} as {uniqueId}\n")
    if missing:
        raise CommandError(f"no such user: {', '.join(missing)}", EX_NOUSER)


def _dbUpgrade(store, args, out, stdin):
    database = store.database
    applied = upgrade(database)
    for migration in applied:
        out.write(f"applied migration {migration.version}: {migration.description}\n")
    out.write(f"schema is at version {LATEST}\n")


def _dbCopy(store, args, out, stdin):
    from mailgate.store.copy import CopyError, copyDatabase

    source = openSynchronousStore(args.source)
    try:
        target = openSynchronousStore(args.target)
        try:
            report = copyDatabase(source, target)
        except CopyError as e:
            raise CommandError(str(e), EX_CANTCREAT)
        finally:
            target.close()
    finally:
        source.close()
    out.write(
        f"copied {report.users} users and {report.messages} messages "
        f"({report.bodies} bodies, {report.octets} octets); unique ids preserved\n"
    )


def _dbVersion(store, args, out, stdin):
    version = store.database.run(currentVersion)
    out.write(f"schema version {version} (this mailgate: {LATEST})\n")


SERVE_DESCRIPTION = "POP3 / SMTP / LMTP mail gateway over SQLite or PostgreSQL"


def _serveOptions():
    """
    The options of C{twistd mailgate}, introduced as C{mailgate serve}'s.
    """
    from mailgate.tap import Options

    class ServeOptions(Options):
        synopsis = "Usage: mailgate serve [options]"

    return ServeOptions()


def _serve(argv, database, stdout, stderr):
    """
    Run the server in the foreground with C{twistd mailgate}'s options, as
    C{twistd -n --pidfile= mailgate} does, logging to standard output.

    It needs no twistd plugin: the service maker is given to twistd's
    runner here, so this works where Twisted's plugin scan cannot find
    C{twisted/plugins/mailgate_plugin.py} (an editable install).

    @param database: the C{--database} given to C{mailgate} itself, if
        any; C{serve}'s own C{--database} wins.
    @return: the exit status once the server has stopped.
    """
    from twisted.python import usage

    if database is not None:
        argv = ["--database", database, *argv]
    options = _serveOptions()
    try:
        with contextlib.redirect_stdout(stdout):
            options.parseOptions(argv)
    except usage.UsageError as e:
        stderr.write(f"mailgate serve: {e}\n{options.getSynopsis()}\n(see mailgate serve --help)\n")
        return EX_USAGE
    except SystemExit as e:
        # --help, --version
        return EX_OK if not e.code else EX_USAGE

    from twisted.application.service import ServiceMaker
    from twisted.scripts.twistd import ServerOptions, runApp

    maker = ServiceMaker("mailgate", "mailgate.tap", SERVE_DESCRIPTION, "mailgate")

    class ServeServerOptions(ServerOptions):
        def _getPlugins(self, interface):
            return [maker]

    config = ServeServerOptions()
    config.parseOptions(["--nodaemon", "--pidfile=", "mailgate", *argv])
    runApp(config)
    return EX_OK


# -- bans (the connection policy's, shared through the database) -----------


def _banAddress(text):
    from mailgate.policy.addresses import addressText

    try:
        return addressText(text)
    except ValueError:
        raise CommandError(f"not an IP address: {text!r}", EX_DATAERR)


def _utc(at):
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _policyStore(store):
    from mailgate.store.policy import SQLPolicyStore

    return SQLPolicyStore(store.database)


def _banList(store, args, out, stdin):
    import time

    bans = _result(_policyStore(store).listBans(time.time()))
    out.write(f"{'ADDRESS':<39} {'REASON':<14} {'FAILURES':>8}  EXPIRES\n")
    for ban in bans:
        out.write(f"{ban.address:<39} {ban.reason:<14} {ban.failures:>8}  {_utc(ban.expires)}\n")


def _banAdd(store, args, out, stdin):
    import ipaddress
    import time

    from mailgate.policy.addresses import DEFAULT_EXEMPT_NETWORKS

    address = _banAddress(args.address)
    if args.duration <= 0:
        raise CommandError("--for takes a positive number of seconds", EX_USAGE)
    ban = _result(_policyStore(store).addBan(address, time.time(), args.duration))
    out.write(f"banned {address} until {_utc(ban.expires)}\n")
    ip = ipaddress.ip_address(address)
    if any(ip in ipaddress.ip_network(n) for n in DEFAULT_EXEMPT_NETWORKS):
        out.write(
            f"note: {address} is in the default --exempt-network; servers exempting it "
            f"do not enforce this ban\n"
        )


def _banDel(store, args, out, stdin):
    address = _banAddress(args.address)
    if not _result(_policyStore(store).removeBan(address)):
        raise CommandError(f"no ban for {address}")
    out.write(f"lifted the ban of {address}; its failed logins are forgotten\n")


def _addBanCommands(commands):
    """
    C{mailgate ban list|add|del}: running servers (every node) enforce a
    change within seconds.
    """
    from mailgate.policy.settings import BAN_TIME

    ban = commands.add_parser(
        "ban",
        help="list, add and lift bans of client addresses",
        description="Bans of client addresses, shared by every server on the database: "
        "a running server enforces a ban added or lifted here within 5 seconds.",
    ).add_subparsers(dest="action", metavar="ACTION")
    ban.required = True
    banList = ban.add_parser("list", help="list the bans in force: address, reason, failures, expiry (UTC)")
    banList.set_defaults(run=_banList, migrate=True)
    banAdd = ban.add_parser("add", help="ban an address (replacing a ban it has)")
    banAdd.add_argument("address", metavar="ADDRESS")
    banAdd.add_argument(
        "--for",
        dest="duration",
        type=int,
        default=BAN_TIME,
        metavar="SECONDS",
        help=f"how long the ban lasts (default: {BAN_TIME})",
    )
    banAdd.set_defaults(run=_banAdd, migrate=True)
    banDel = ban.add_parser("del", help="lift an address's ban and forget its failed logins")
    banDel.add_argument("address", metavar="ADDRESS")
    banDel.set_defaults(run=_banDel, migrate=True)


def buildParser():
    parser = argparse.ArgumentParser(
        prog="mailgate",
        description="Administer a mailgate database: users, maildrops, local delivery.",
    )
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    parser.add_argument(
        "--database",
        metavar="URL",
        help="database URL (default: $MAILGATE_DATABASE, else " + DEFAULT_DATABASE + ")",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    user = commands.add_parser("user", help="manage users").add_subparsers(
        dest="action", metavar="ACTION"
    )
    user.required = True
    add = user.add_parser("add", help="add a user")
    add.add_argument("address")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument(
        "--apop",
        action="store_true",
        help="also allow APOP; this keeps the password recoverable in the database (see README)",
    )
    add.set_defaults(run=_userAdd, migrate=True)
    passwd = user.add_parser("passwd", help="change a user's password")
    passwd.add_argument("address")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    passwd.set_defaults(run=_userPasswd, migrate=True)
    delete = user.add_parser("del", help="delete a user and their maildrop")
    delete.add_argument("address")
    delete.set_defaults(run=_userDel, migrate=True)
    listing = user.add_parser("list", help="list users")
    listing.set_defaults(run=_userList, migrate=True)
    apop = user.add_parser("apop", help="switch APOP on or off for a user")
    apop.add_argument("address")
    apop.add_argument("state", choices=["on", "off"])
    apop.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    apop.set_defaults(run=_userApop, migrate=True)

    mailbox = commands.add_parser("mailbox", help="inspect maildrops").add_subparsers(
        dest="action", metavar="ACTION"
    )
    mailbox.required = True
    mlist = mailbox.add_parser("list", help="list a user's messages as POP3 numbers them")
    mlist.add_argument("address")
    mlist.set_defaults(run=_mailboxList, migrate=True)

    deliver = commands.add_parser(
        "deliver", help="deliver a message from standard input to local users"
    )
    deliver.add_argument("addresses", nargs="+", metavar="ADDRESS")
    deliver.add_argument(
        "-f",
        "--sender",
        metavar="ADDRESS",
        help="the envelope sender (e.g. Postfix's ${sender}); adds Return-Path: and Received: "
        "fields, as SMTP and LMTP delivery do (use '' for the null sender)",
    )
    deliver.set_defaults(run=_deliver, migrate=True)

    db = commands.add_parser("db", help="database maintenance").add_subparsers(
        dest="action", metavar="ACTION"
    )
    db.required = True
    dbUpgrade = db.add_parser("upgrade", help="apply pending schema migrations")
    dbUpgrade.set_defaults(run=_dbUpgrade, migrate=False)
    dbVersion = db.add_parser("version", help="show the schema version")
    dbVersion.set_defaults(run=_dbVersion, migrate=False)
    dbCopy = db.add_parser(
        "copy",
        help="copy users and maildrops to another (empty) database, keeping unique ids",
        description="Copy every user and maildrop from one database to another, "
        "e.g. from SQLite to PostgreSQL, preserving message numbers and unique ids. "
        "Stop the servers using either database first.",
    )
    dbCopy.add_argument("--from", dest="source", required=True, metavar="URL", help="the database to copy")
    dbCopy.add_argument("--to", dest="target", required=True, metavar="URL", help="an empty database to copy into")
    dbCopy.set_defaults(run=_dbCopy, migrate=False, store=False)

    # Its options are twistd mailgate's, parsed by mailgate.tap: passed on as
    # they are (see run).
    commands.add_parser(
        "serve",
        add_help=False,
        help="run the server in the foreground, with the options of twistd mailgate "
        "(mailgate serve --help lists them)",
    ).set_defaults(run=None)
    _addBanCommands(commands)
    return parser


def run(argv, stdin=None, stdout=None, stderr=None, environ=None):
    """
    Run the command; return its exit code.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
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
    if args.command == "serve":
        return _serve(rest, args.database, stdout, stderr)
    url = args.database or environ.get("MAILGATE_DATABASE") or DEFAULT_DATABASE
    delivering = args.run is _deliver
    store = None
    try:
        if getattr(args, "store", True):
            store = openSynchronousStore(url, migrate=args.migrate)
        args.run(store, args, stdout, stdin)
        return EX_OK
    except CommandError as e:
        stderr.write(f"mailgate: {e}\n")
        return e.code
    except TemporaryFailure as e:
        stderr.write(f"mailgate: temporary failure, try again: {e}\n")
        return EX_TEMPFAIL
    except ConfigurationError as e:
        stderr.write(f"mailgate: {e}\n")
        return EX_TEMPFAIL if delivering else EX_CONFIG
    except MailgateError as e:
        stderr.write(f"mailgate: {e}\n")
        return EX_TEMPFAIL if delivering else EX_SOFTWARE
    except KeyboardInterrupt:
        stderr.write("mailgate: interrupted\n")
        return 130
    except Exception as e:
        stderr.write(f"mailgate: internal error: {e.__class__.__name__}: {e}\n")
        return EX_TEMPFAIL if delivering else EX_SOFTWARE
    finally:
        if store is not None:
            store.close()


def main():
    sys.exit(run(sys.argv[1:]))
