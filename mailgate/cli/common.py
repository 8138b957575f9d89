# -*- test-case-name: tests.test_cli -*-
"""
Shared by the commands of C{mailgate}: the exit codes (sysexits(3)), the
one-line command error, and reading what an administrator gives (addresses,
passwords, numbers, limits) and writing what a command answers.
"""

import datetime
import getpass
import ipaddress
import json
import math

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from mailgate.address import asciiDomain, normalizeAddress
from mailgate.auth.foreign import CLEARTEXT, UnusableHash, splitScheme
from mailgate.auth.passwords import importedCredentials, needsUpgrade
from mailgate.cli import audit
from mailgate.errors import InvalidAddress, NoSuchUser
from mailgate.networks import LOCAL, parseAllowedNetworks, peerAllowed
from mailgate.printable import printable
from mailgate.store.bounds import MAX_DAYS, MAX_MESSAGES, parseWhole
from mailgate.store.limits import DEFAULT, UNLIMITED, describeLimit

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
#: What a shell reports for a command killed by SIGPIPE (C{ls | head}):
#: the reader of standard output went away before the command was done.
EXIT_READER_GONE = 128 + 13


class CommandError(Exception):
    """
    A failure to report in one line, with its exit code.
    """

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


class OutputFailed(Exception):
    """
    Standard output could not be written (a full disk, an I/O error, or
    closed when the command started): not a fault of mailgate's, and
    said in one line with exit 74 (C{deliver}, which writes only once the
    message is stored, exits 0).  A reader gone (C{| head}) is not this:
    its C{BrokenPipeError} goes through as it is (exit 141).
    """


class Output:
    """
    Standard output as the commands write to it: a failure to write is
    an L{OutputFailed} rather than whatever the stream raised (or an
    C{AttributeError} where Python gives a closed standard output as
    C{None}), which was reported as an internal error, exit 70.

    @ivar buffer: the binary stream underneath, likewise wrapped, or
        C{None} (a text stream with none, as in tests).
    """

    def __init__(self, stream):
        self._stream = stream

    def write(self, data):
        return self._call("write", data)

    def flush(self):
        return self._call("flush")

    @property
    def buffer(self):
        binary = getattr(self._stream, "buffer", None)
        return None if binary is None else Output(binary)

    def _call(self, name, *args):
        if self._stream is None:
            raise OutputFailed("cannot write to standard output: it is closed")
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputFailed(f"cannot write to standard output: {e.strerror or e}") from None


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


def _shown(line):
    """
    A line of an import's report (or of its refusal, or of user import's)
    as the administrator's terminal (or a cron mail) gets it: anything
    unprintable as C{?}.  It names what the source chose, a maildir's path
    and file names (whoever could write in the maildir chose them), a POP3
    server's words or a path as given, and a terminal obeys the escape
    sequences they may hold (a window title, a cleared screen), a line
    break starting a line that may look like mailgate's own.
    """
    return printable(line)


def _address(text):
    """
    A user's address as the command line gives it, normalised: a domain
    written in Unicode is its ASCII form (IDNA), as SMTP, LMTP and
    C{deliver} take it, so that C{user add alice@bücher.example} adds the
    user mail to that address reaches (it was refused as an invalid
    domain, though C{deliver} to it worked).
    """
    local, at, domain = text.rpartition("@")
    if at and domain and not domain.isascii():
        text = f"{local}@{asciiDomain(domain.strip()) or domain}"
    try:
        return normalizeAddress(text)
    except InvalidAddress as e:
        raise CommandError(str(e), EX_DATAERR)



def _readAddresses(*names, then=None):
    """
    A command's C{readOptions} (run before the database is opened) that
    reads its address arguments, the attributes C{names} of its
    arguments (a list of them too), in place, and then calls C{then}
    with the arguments if given: a mistyped address is bad data (65)
    whatever the database's state, not "no such database file" (78), and
    a command that creates the database (C{user add}) no longer makes
    one for an address it then refuses.
    """

    def readOptions(args):
        for name in names:
            value = getattr(args, name)
            if isinstance(value, list):
                setattr(args, name, [_address(text) for text in value])
            elif value is not None:
                setattr(args, name, _address(value))
        if then is not None:
            then(args)

    return readOptions


#: The longest line read from standard input for a password or a hash,
#: in octets: reading is bounded (a password from /dev/zero, or from a
#: file without line ends, was read whole into memory).
MAX_PASSWORD_LINE = 4096

#: The longest password a command sets, in octets of UTF-8: beyond any
#: password typed, and what POP3's AUTH PLAIN and AUTH LOGIN carry whole
#: with any address (a SASL response line of 4096 octets, in base64);
#: USER/PASS carries up to 248 (a command line of 255).
MAX_PASSWORD = 1024


def _passwordLine(stdin):
    """
    One line of standard input, without its line end, as UTF-8 text read
    from its octets: not decoded in the locale's encoding, in which a
    UTF-8 password would be read as another one (a Latin-1 locale), or
    fail (a strict one).

    @raise CommandError: standard input closed or failing (66), a line
        longer than L{MAX_PASSWORD_LINE} octets, or not UTF-8 (65).
    """
    if stdin is None:
        # Python's standard input where the command started with it closed.
        raise CommandError("standard input is closed: nothing to read the password from", EX_NOINPUT)
    binary = getattr(stdin, "buffer", None)
    try:
        if binary is not None:
            line = binary.readline(MAX_PASSWORD_LINE + 3)
        else:
            line = stdin.readline(MAX_PASSWORD_LINE + 3).encode("utf-8", "surrogateescape")
    except UnicodeError:
        raise CommandError("the password is not UTF-8 text", EX_DATAERR) from None
    except OSError as e:
        raise CommandError(f"cannot read standard input: {e.strerror or e}", EX_NOINPUT) from None
    line = line.rstrip(b"\r\n")
    if line.startswith(b"\xef\xbb\xbf"):
        # The byte order mark an editor (Windows' Notepad) puts first in a
        # file is not part of the password, as it is not of user import's
        # first name: kept, it was invisibly in the scrypt hash, so the
        # password typed failed USER/PASS and PLAIN, while SCRAM, whose
        # SASLprep maps it to nothing, took it.
        line = line[3:]
    if len(line) > MAX_PASSWORD_LINE:
        raise CommandError(
            f"the line read is longer than {MAX_PASSWORD_LINE} octets: no password (or hash) is that long", EX_DATAERR
        )
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("the password is not UTF-8 text", EX_DATAERR) from None


def _checkNewPassword(password):
    """
    Refuse a password to set that is longer than L{MAX_PASSWORD} octets.
    """
    size = len(password.encode("utf-8"))
    if size > MAX_PASSWORD:
        raise CommandError(
            f"the password is {size} octets long, at most {MAX_PASSWORD} (what POP3's AUTH PLAIN and "
            "AUTH LOGIN carry with any address)",
            EX_DATAERR,
        )


def _pastedHash(text):
    """
    A hash as given to C{--hashed}, without the spaces a paste brings
    around it, except those ending a password kept in clear
    (C{{PLAIN}secret }), which are the password's.
    """
    hashed = text.strip()
    try:
        scheme, encoding, _ = splitScheme(hashed)
    except UnusableHash:
        return hashed
    return text.lstrip() if scheme in CLEARTEXT and encoding is None else hashed


def _givenHash(text, cramMD5=False):
    """
    What the store keeps for a password hash read for C{--hashed} (a
    user's, a master user's): one another server made (Dovecot's
    C{{SCHEME}...}, a bare crypt string), checked to be one a password
    can be checked against.

    @param cramMD5: see L{mailgate.auth.passwords.importedCredentials}.
    @raise CommandError: it is no such hash (65), saying why.
    """
    try:
        return importedCredentials(_pastedHash(text), cramMD5=cramMD5)
    except UnusableHash as e:
        raise CommandError(f"unusable password hash: {e}", EX_DATAERR) from None


def _checkPasswordSource(args, stdin):
    """
    A command's C{readOptions} check (run before the database is opened)
    that its password can be read: with C{--password-stdin}, from a
    standard input that is open; without, on a terminal.  Said once the
    database was opened, it was "no such database file" (78) on a SQLite
    file not there, and C{user add} made one first.
    """
    if args.password_stdin:
        if stdin is None:
            # Python's standard input where the command started with it closed.
            raise CommandError("standard input is closed: nothing to read the password from", EX_NOINPUT)
    elif not (hasattr(stdin, "isatty") and stdin.isatty()):
        raise CommandError("no terminal to ask for a password on; use --password-stdin", EX_USAGE)


def _readPassword(args, stdin, confirm=True):
    """
    The password: one line from standard input with C{--password-stdin},
    else asked for twice on the terminal.
    """
    _checkPasswordSource(args, stdin)
    if args.password_stdin:
        password = _passwordLine(stdin)
    else:
        try:
            password = getpass.getpass("Password: ")
            if confirm and getpass.getpass("Again: ") != password:
                raise CommandError("the passwords differ", EX_DATAERR)
        except EOFError:
            # Ctrl-D at the prompt: was internal error: EOFError, exit 70.
            raise CommandError("no password given (end of input at the prompt)", EX_DATAERR) from None
        except UnicodeDecodeError as e:
            # A terminal sending another encoding than the locale's (PuTTY
            # set to Latin-1 on a UTF-8 host: é typed is one octet, 0xE9):
            # was internal error: UnicodeDecodeError, exit 70.
            raise CommandError(
                f"the password typed is not {e.encoding} text (the locale's encoding, which the terminal must "
                "send)", EX_DATAERR,
            ) from None
    # Blanked in the audit line, should an error quote it.
    audit.secret(args, password)
    if not password:
        raise CommandError("empty password", EX_DATAERR)
    if "\0" in password:
        raise CommandError("the password contains a NUL character", EX_DATAERR)
    try:
        # Python reads bytes that are not UTF-8 as lone surrogates
        # (surrogateescape), which no password hash can take.
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise CommandError("the password is not UTF-8 text", EX_DATAERR) from None
    return password


def _clientAddress(text):
    """
    The Twisted address of a client at C{text} (an IP address, or
    L{LOCAL} for one on a Unix socket), as a server's connection has it:
    what L{peerAllowed} is given at a login (C{user test --from},
    C{master test --from}).
    """
    if text.lower() == LOCAL:
        return UNIXAddress(None)
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise CommandError(
            f"--from {printable(text)!r} is not an IP address (give the client's, e.g. 192.0.2.7, or local)", EX_USAGE
        ) from None
    return (IPv4Address if ip.version == 4 else IPv6Address)("TCP", text, 0)


def _domainNote(args, address, whose=None):
    """
    A note where the server's configuration file (C{--config}) lists the
    domains it takes mail for (C{domain}) and C{address}'s is not one: its
    mail is refused as relaying until the domain is added.  Said by the
    commands that make an address (alias add, user add, rename, import).

    @param whose: what the refused mail is addressed to, C{address} by
        default (an import names a domain's users or aliases).
    """
    domains = getattr(args, "domains", None)
    domain = address.rpartition("@")[2]
    if domains and domain not in domains:
        return (
            f"note: {domain} is not among the configuration's domains: the server refuses mail to "
            f"{whose or address} (relay access denied) until it is\n"
        )
    return ""


def _networksArgument(text):
    """
    A command's C{NETWORKS} (C{user networks}, C{master networks}, C{master
    add --networks}), read before the database is opened: their canonical
    text (L{parseAllowedNetworks}), C{None} for C{any}.  Nothing given
    (C{""}, C{","}: a shell variable left unset) is refused rather than
    read as C{any}, which lifted a user's restriction without a word.

    @raise CommandError: not networks (exit 64).
    """
    hint = "(give CIDR networks or addresses, local, or any)"
    if not text.replace(",", "").strip():
        raise CommandError(f"NETWORKS: none given in {printable(text)!r} {hint}", EX_USAGE)
    try:
        return parseAllowedNetworks(text)
    except ValueError as e:
        raise CommandError(f"NETWORKS: {e} {hint}", EX_USAGE) from None


def _hashKept(passwordHash):
    """
    What a password was checked against, for C{user test} and C{master
    test}: a hash imported from another server, or mailgate's own.
    """
    return "the hash imported from another server" if needsUpgrade(passwordHash) else "mailgate's own hash"


def _networksSaid(out, args, who, allowed, command, theirs="its"):
    """
    C{user test}'s and C{master test}'s lines on the networks C{who} may
    log in from (C{allowed}: as stored, C{None} for anywhere), set with
    C{command}, and with C{--from} (C{args.peer}) whether a login from
    there is let in, as the server's own check (L{peerAllowed}) has it.

    @param theirs: whose networks a refusal names.
    @return: the refusal of a login from C{--from}, or C{None}.
    """
    if allowed is not None:
        out.write(
            f"{who} may log in from {printable(allowed)} only ({command}): a login from elsewhere is refused as a "
            "wrong password is\n"
        )
    if args.peer is None:
        return None
    client = "a Unix socket (local)" if args.client.lower() == LOCAL else printable(args.client)
    if allowed is None:
        out.write(f"{who} may log in from anywhere: from {client} too\n")
    elif peerAllowed(args.peer, allowed):
        out.write(f"a login from {client} is let in: it is on one of those networks\n")
    else:
        out.write(f"a login from {client} is refused: it is on none of those networks\n")
        return f"from {client}, on none of {theirs} networks"
    return None


def _networksChanged(out, args, who, previous, networks, refused):
    """
    What C{user networks} and C{master networks} say (and put in the audit
    trail) of the networks C{who} may log in from, now C{networks} (C{None}:
    anywhere), before C{previous}.

    @param refused: how a login from elsewhere is refused, said after the
        networks a restriction names.
    """
    shown = networks or "any"
    if previous == networks:
        out.write(f"{who} may log in from {shown} already; nothing changed\n")
        audit.outcome(args, f"{shown} already; nothing changed")
    elif networks is None:
        out.write(f"{who} may log in from anywhere again (was {previous})\n")
        audit.outcome(args, f"any (was {previous})")
    else:
        out.write(f"{who} may log in from {shown} only: {refused}\n")
        audit.outcome(args, f"{shown} (was {previous or 'any'})")


def _forUser(address, d):
    """
    The result of C{d}, a store call about the account C{address}: the
    store's L{NoSuchUser} becomes this command's "no such user" error.
    """
    try:
        return _result(d)
    except NoSuchUser:
        raise CommandError(f"no such user: {address}", EX_NOUSER) from None


def _existingUser(store, address):
    user = _result(store.findUser(address))
    if user is None:
        raise CommandError(f"no such user: {address}", EX_NOUSER)
    return user


def _inSession(address):
    """
    The refusal of a command that would change a maildrop a POP3 session
    has open.
    """
    return CommandError(
        f"{address} is in a POP3 session; try again once it ended (or end it: mailgate kick {address})",
        EX_TEMPFAIL,
    )


def _jsonLines(out, records):
    """
    C{--json}: one JSON object per line, for scripts (C{jq}, or a line at a
    time): the same rows as the table, whose widths and words are for
    people and may change, under keys that do not.
    """
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")


def _limitValue(own, unit=None):
    """
    A user's own limit as C{--json} gives it: a number, C{"default"}, or
    C{"none"} (C{"never"} for days).
    """
    if own is None or own < 0:
        return describeLimit(own, unit)
    return own


def _warnIfFull(args, address, status):
    """
    Say (a warning on standard error) when a command left C{address}'s
    mailbox full, by C{status} (its L{mailgate.records.QuotaStatus} now):
    a quota set below the use, or a restore past it (restores are never
    refused), makes every new message refused, for days and then
    bounced, which the command's own output did not tell.  Only the
    limits known here count: the user's own, or the server's default
    from C{--config}.
    """
    from mailgate.plural import counted

    if status is None:
        return
    full = []
    if status.quotaOctets is not None and status.usedOctets >= status.quotaOctets:
        full.append(f"{counted(status.usedOctets, 'octet')} of its {status.quotaOctets}")
    if status.quotaMessages is not None and status.usedMessages >= status.quotaMessages:
        full.append(f"{counted(status.usedMessages, 'message')} of its {status.quotaMessages}")
    if full:
        args.stderr.write(
            f"mailgate: warning: {address} is full now ({' and '.join(full)}): new mail to it is refused "
            "until messages are removed or its quota is raised\n"
        )


def _limit(text, parse, what):
    """
    A limit as the store keeps it, from C{default}, C{none} / C{never} or
    a value.
    """
    word = text.strip().lower()
    if word == "default":
        return DEFAULT
    if word in ("none", "never", "unlimited"):
        return UNLIMITED
    return _number(text, parse, what)


def _number(text, parse, what, minimum=0):
    """
    A number given on the command line, read by C{parse} (which refuses
    what is not one, or too large, with L{ValueError}) and at least
    C{minimum}: anything else is a usage error that says why.
    """
    try:
        value = parse(text)
    except ValueError as e:
        raise CommandError(f"bad {what}: {e}", EX_USAGE)
    if value < minimum:
        reason = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
        raise CommandError(f"bad {what}: {reason}", EX_USAGE)
    return value


def _messageCount(text):
    return parseWhole(text, MAX_MESSAGES)


def _dayCount(text):
    return parseWhole(text, MAX_DAYS)


def _seconds(text):
    """
    A finite number of seconds, as a float.
    """
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _addHashed(parser, kept="kept, and replaced by mailgate's own at the user's first login"):
    """
    C{--hashed}, of every command that takes a password hash another
    server made instead of a password; C{kept} says what becomes of it.
    """
    parser.add_argument(
        "--hashed",
        action="store_true",
        help="what is read is a password hash another server made, as Dovecot writes it "
        f"({{SHA512-CRYPT}}$6$..., {{BLF-CRYPT}}..., a bare $6$... crypt string, ...): {kept}",
    )


def _time(seconds):
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _addPasswordStdin(parser):
    """
    C{--password-stdin}, of every command that reads a password (given to
    L{_readPassword} and L{_checkPasswordSource}, which read it): declared
    here once, so that each such command says it alike.
    """
    parser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")


def _addJSON(parser):
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line, for scripts, instead of the table",
    )
