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
  mailgate import maildir DIR ADDRESS [--uidl-format FORMAT]
  mailgate import pop3 URL [ADDRESS] [--password-stdin] [--insecure] [--delete] [--users FILE]
                       [--max-message-size SIZE] [--master-user NAME [--master-separator SEP]]
  mailgate who [--json]
  mailgate kick ADDRESS [--wait SECONDS]
  mailgate deliver [-f SENDER] ADDRESS... < message
  mailgate db upgrade
  mailgate db version
  mailgate db copy --from URL --to URL
  mailgate serve [options of twistd mailgate]
  mailgate ban list [--json]
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
import json
import math
import os
import re
import select
import sys
import time

from mailgate import __version__
from mailgate.address import normalizeAddress, normalizeDomain
from mailgate.auth.foreign import CLEARTEXT, UnusableHash, splitScheme
from mailgate.auth.passwords import (
    StoredCredentials,
    importedCredentials,
    makeCredentials,
    needsUpgrade,
    verifyPassword,
)
from mailgate.errors import (
    ConfigurationError,
    InvalidAddress,
    MaildropInUse,
    MailgateError,
    NoSuchUser,
    QuotaExceeded,
    TemporaryFailure,
    UserExists,
)
from mailgate.importers.passwdfile import RefusedLine, readPasswdFile
from mailgate.message import spoolFile
from mailgate.store import DEFAULT_DATABASE, NoSuchDatabase, openSynchronousStore
from mailgate.store.bounds import MAX_DAYS, MAX_MESSAGES, MAX_SIZE, parseSize, parseWhole
from mailgate.store.lifecycle import DAY, DEFAULT, UNLIMITED, describeLimit
from mailgate.store.schema import LATEST, recordedVersion, upgrade

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
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
        try:
            line = stdin.readline()
        except UnicodeDecodeError:
            raise CommandError("the password is not UTF-8 text", EX_DATAERR) from None
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
    try:
        # Python reads bytes that are not UTF-8 as lone surrogates
        # (surrogateescape), which no password hash can take.
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise CommandError("the password is not UTF-8 text", EX_DATAERR) from None
    return password


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


def _credentials(args, password, apop):
    """
    What the store keeps for what was read: a password, or with
    C{--hashed} a hash another server made (Dovecot's C{{SCHEME}...}).
    """
    if not args.hashed:
        return makeCredentials(password, apop=apop)
    if apop:
        raise CommandError("APOP needs the password itself, not a hash", EX_USAGE)
    try:
        return importedCredentials(_pastedHash(password))
    except UnusableHash as e:
        raise CommandError(f"unusable password hash: {e}", EX_DATAERR) from None


def _userAdd(store, args, out, stdin):
    address = _address(args.address)
    if args.hashed and args.apop:
        raise CommandError("APOP needs the password itself, not a hash", EX_USAGE)
    password = _readPassword(args, stdin)
    try:
        _result(store.addUser(address, _credentials(args, password, args.apop)))
    except UserExists:
        raise CommandError(f"user {address} already exists", EX_CANTCREAT)
    out.write(f"added {address}{' (APOP enabled)' if args.apop else ''}\n")


def _storedQuota(address, quota):
    """
    The C{setQuota} changes of a passwd-file account's quota (numbers, 0
    for no limit, as Dovecot has them).

    @raise CommandError: a quota larger than mailgate keeps.
    """
    changes = {}
    for what, amount in quota.items():
        if amount > (MAX_MESSAGES if what == "messages" else MAX_SIZE):
            raise CommandError(f"{address}: its quota ({amount} {what}) is larger than mailgate keeps", EX_DATAERR)
        changes[what] = amount or UNLIMITED
    return changes


def _staleImport(store, address, credentials):
    """
    The stored hash of a user imported before, if it still is the one
    imported (they have not logged in to mailgate since) and is not the
    one the passwd-file has now (they changed their password on the old
    server while the move went on); else C{None}.
    """
    user = _result(store.findUser(address))
    if user is None or not needsUpgrade(user.passwordHash) or user.passwordHash == credentials.passwordHash:
        return None
    return user.passwordHash


def _userImport(store, args, out, stdin):
    """
    Add the users of a Dovecot passwd-file, keeping their password hashes
    (replaced by mailgate's own at each user's first login).  Users that
    exist already are left as they are, so a run can be repeated; with
    C{--refresh}, those still with an imported hash take the file's.
    """
    # Dovecot's passwd-file passdb reads a password without a {SCHEME}
    # prefix in the scheme its args give (scheme=PLAIN), CRYPT by default.
    scheme = args.scheme
    if scheme is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", scheme):
        raise CommandError(f"--scheme {scheme!r} is not a scheme's name (PLAIN, SHA512-CRYPT...)", EX_USAGE)
    domain = None
    if args.domain is not None:
        try:
            domain = normalizeDomain(args.domain)
        except InvalidAddress as e:
            raise CommandError(str(e), EX_USAGE) from None
    try:
        if args.file == "-":
            lines = stdin.read().splitlines()
        else:
            # Octets that are not UTF-8 (a gecos field in Latin-1, copied
            # from an old /etc/passwd) are kept as they are, and refuse
            # only a line whose name or hash has some; the byte order mark
            # an editor may put first is not part of the first user's name.
            with open(args.file, encoding="utf-8-sig", errors="surrogateescape") as f:
                lines = f.read().splitlines()
    except OSError as e:
        raise CommandError(f"cannot read {args.file}: {e.strerror}", EX_NOINPUT)
    added = updated = present = failed = 0
    for account in readPasswdFile(lines, domain, scheme):
        try:
            if isinstance(account, RefusedLine):
                raise CommandError(account.reason, EX_DATAERR)
            address = account.address
            try:
                credentials = importedCredentials(account.password, apop=args.apop)
            except UnusableHash as e:
                raise CommandError(f"{address}: unusable password hash: {e}", EX_DATAERR) from None
            quota = _storedQuota(address, account.quota)
            try:
                _result(store.addUser(address, credentials))
            except UserExists:
                stale = _staleImport(store, address, credentials)
                if stale is not None and args.refresh and _result(
                    # Over the hash read just now only: a first login
                    # meanwhile wins.
                    store.upgradeCredentials(address, stale, credentials)
                ):
                    updated += 1
                    out.write(f"updated {address}\n")
                    continue
                present += 1
                hint = "" if stale is None or args.refresh else " (its imported password is not the file's: --refresh)"
                out.write(f"exists {address}{hint}\n")
                continue
            if quota:
                _result(store.setQuota(address, **quota))
            apop = " (APOP enabled)" if credentials.apopSecret is not None else ""
        except CommandError as e:
            if e.code == EX_TEMPFAIL:
                raise
            failed += 1
            args.stderr.write(f"mailgate: {args.file} line {account.number}: {e}\n")
            continue
        added += 1
        out.write(f"added {address}{apop}\n")
    refreshed = f"{updated} updated, " if args.refresh else ""
    out.write(f"{added} added, {refreshed}{present} already there, {failed} failed\n")
    if failed:
        raise CommandError(f"{failed} line(s) of {args.file} not imported", EX_DATAERR)


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


def _userPasswd(store, args, out, stdin):
    address = _address(args.address)
    user = _existingUser(store, address)
    password = _readPassword(args, stdin)
    if args.hashed and user.apopSecret is not None:
        raise CommandError(f"{address} has APOP, which needs the password itself, not a hash", EX_USAGE)
    credentials = _credentials(args, password, user.apopSecret is not None)
    _result(store.setCredentials(address, credentials))
    out.write(f"password changed for {address}\n")


def _inSession(address):
    """
    The refusal of a command that would change a maildrop a POP3 session
    has open.
    """
    return CommandError(
        f"{address} is in a POP3 session; try again once it ended (or end it: mailgate kick {address})",
        EX_TEMPFAIL,
    )


def _userDel(store, args, out, stdin):
    address = _address(args.address)
    try:
        _forUser(address, store.deleteUser(address))
    except MaildropInUse:
        raise _inSession(address)
    out.write(f"deleted {address} and their maildrop\n")


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


def _userList(store, args, out, stdin):
    users = _result(store.listUsers())
    if args.json:
        return _jsonLines(out, (
            {
                "address": user.address,
                "messages": user.messages,
                "octets": user.octets,
                "apop": bool(user.apop),
                "password": "imported" if user.passwordImported else "mailgate",
                "quota_octets": _limitValue(user.quotaOctets),
                "quota_messages": _limitValue(user.quotaMessages),
                "expire_days": _limitValue(user.expireDays, "days"),
            }
            for user in users
        ))
    out.write(f"{'ADDRESS':<40} {'MESSAGES':>8} {'OCTETS':>12}  APOP {'QUOTA':>8} {'MAX-MSGS':>8} EXPIRE\n")
    for user in users:
        out.write(
            f"{user.address:<40} {user.messages:>8} {user.octets:>12}  "
            f"{'on' if user.apop else 'off':<4} {describeLimit(user.quotaOctets, 'octets'):>8} "
            f"{describeLimit(user.quotaMessages):>8} {describeLimit(user.expireDays, 'days')}\n"
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


def _userQuota(store, args, out, stdin):
    from mailgate.config import ZERO_QUOTA

    address = _address(args.address)
    octets = _limit(args.size, parseSize, "size")
    changes = {"octets": octets}
    if args.messages is not None:
        changes["messages"] = _limit(args.messages, _messageCount, "message count")
    for what, value in (("size", octets), ("message count", changes.get("messages"))):
        if value == 0:
            # As for --default-quota: not "no limit" (Dovecot's 0) but a
            # mailbox that refuses all mail.
            raise CommandError(f"bad {what}: {ZERO_QUOTA}", EX_USAGE)
    _forUser(address, store.setQuota(address, **changes))
    status = _result(store.quotaOf(address))
    text = f"quota of {address}: {describeLimit(octets, 'octets')}"
    if "messages" in changes:
        text += f", messages: {describeLimit(changes['messages'])}"
    out.write(f"{text}; in use: {status.usedMessages} messages, {status.usedOctets} octets\n")


def _userExpire(store, args, out, stdin):
    from mailgate.config import ZERO_DAYS

    address = _address(args.address)
    days = _limit(args.days, _dayCount, "number of days")
    if days == 0:
        # As for --expire-days: not "no limit" but all of the user's mail.
        raise CommandError(f"bad number of days: {ZERO_DAYS}", EX_USAGE)
    _forUser(address, store.setExpire(address, days))
    out.write(f"messages of {address} expire after: {describeLimit(days, 'days')}"
              f"{' days' if days not in (DEFAULT, UNLIMITED) else ''}\n")


def _userTest(store, args, out, stdin):
    """
    Check a password as a login would (Dovecot's C{doveadm auth test}),
    without logging in: nothing is changed, not even an imported hash.
    """
    address = _address(args.address)
    user = _existingUser(store, address)
    password = _readPassword(args, stdin, confirm=False)
    if not verifyPassword(password.encode("utf-8"), user.passwordHash):
        raise CommandError(f"that is not the password of {address}", EX_NOPERM)
    kept = "the hash imported from another server" if needsUpgrade(user.passwordHash) else "mailgate's own hash"
    out.write(f"the password of {address} is correct (kept as {kept})\n")


def _userRecount(store, args, out, stdin):
    if args.all == bool(args.addresses):
        raise CommandError("give the ADDRESSes to recount, or --all", EX_USAGE)
    if args.all:
        addresses = [user.address for user in _result(store.listUsers())]
    else:
        addresses = [_address(text) for text in args.addresses]
    wrong = 0
    for address in addresses:
        before, after = _forUser(address, store.recountUsage(address))
        counted = f"{address}: {after[0]} messages, {after[1]} octets"
        if before == after:
            out.write(f"{counted}, as kept\n")
        else:
            wrong += 1
            out.write(f"{counted} (was kept as {before[0]} messages, {before[1]} octets)\n")
    if args.all:
        out.write(f"recounted {len(addresses)} users; the use kept for {wrong} was wrong\n")


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
    messages = _forUser(address, store.listMessages(address))
    if args.json:
        return _jsonLines(out, (
            {"number": m.number, "octets": m.size, "unique_id": m.uniqueId, "arrived": _time(m.arrived)}
            for m in messages
        ))
    out.write(f"{'NUMBER':>6} {'OCTETS':>10}  {'UNIQUE-ID':<20} ARRIVED\n")
    for message in messages:
        out.write(
            f"{message.number:>6} {message.size:>10}  {message.uniqueId:<20} "
            f"{_time(message.arrived)}\n"
        )
    status = _result(store.quotaOf(address))
    if status is not None:
        limits = []
        if status.quotaOctets is not None:
            limits.append(f"{status.quotaOctets} octets")
        if status.quotaMessages is not None:
            limits.append(f"{status.quotaMessages} messages")
        out.write(
            f"\nin use: {status.usedMessages} messages, {status.usedOctets} octets; "
            f"quota: {', '.join(limits) if limits else 'server default'}\n"
        )


def _mailboxDeleted(store, args, out, stdin):
    address = _address(args.address)
    messages = _forUser(address, store.listDeleted(address))
    if args.json:
        return _jsonLines(out, (
            {
                "number": m.number,
                "octets": m.size,
                "unique_id": m.uniqueId,
                "deleted": _time(m.deletedAt),
                "from": m.deletedBy,
            }
            for m in messages
        ))
    out.write(f"{'NUMBER':>6} {'OCTETS':>10}  {'UNIQUE-ID':<20} {'DELETED':<20} FROM\n")
    for message in messages:
        out.write(
            f"{message.number:>6} {message.size:>10}  {message.uniqueId:<20} "
            f"{_time(message.deletedAt):<20} {message.deletedBy or '-'}\n"
        )


_AGO = re.compile(r"^([0-9]+)([smhd])$")
_AGO_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parseTime(text, now):
    """
    Seconds since the epoch from an ISO 8601 time (UTC unless it says
    otherwise: C{2024-05-01T10:00:00Z}, C{2024-05-01 10:00}, C{2024-05-01})
    or a time ago (C{90m}, C{2h}, C{3d}).
    """
    match = _AGO.match(text.strip().lower())
    if match:
        ago = int(match.group(1)) * _AGO_UNITS[match.group(2)]
        if ago > MAX_DAYS * DAY:
            raise CommandError(f"bad time {text[:30]!r}: at most {MAX_DAYS}d ago", EX_USAGE)
        return int(now - ago)
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        return int(moment.timestamp())
    except (ValueError, OverflowError):
        # OverflowError: a time zone that takes the first year before it.
        raise CommandError(
            f"bad time {text[:30]!r}: use e.g. 2024-05-01T10:00:00Z, 2024-05-01 or 2h (ago)", EX_USAGE
        )


def _mailboxRestore(store, args, out, stdin):
    address = _address(args.address)
    since = None if args.since is None else _parseTime(args.since, time.time())
    restored, missing = _forUser(
        address, store.restoreDeleted(address, args.uidls or None, since=since, asNew=args.as_new)
    )
    for old, new in restored:
        out.write(f"restored {old}" + (f" as {new}\n" if new != old else "\n"))
    out.write(f"{len(restored)} messages restored to {address}\n")
    if missing:
        raise CommandError(
            f"not among {address}'s kept deleted messages: {' '.join(missing)}", EX_DATAERR
        )


def _importReport(report, out, stderr, who=None):
    prefix = f"{who}: " if who else ""
    for failure in report.failures:
        stderr.write(f"mailgate: {prefix}{failure}\n")
    out.write(f"{prefix}{report.summary()}\n")


def _importTarget(store, address):
    user = _result(store.findUser(address))
    if user is None:
        raise CommandError(f"no such user: {address} (add it with mailgate user add first)", EX_NOUSER)


def _importMaildir(store, args, out, stdin):
    from mailgate.importers import ImportFailed
    from mailgate.importers.maildir import formatUidl, importMaildir

    if args.uidl_format is not None:
        # Checked before the maildir is read, so that a format's own
        # mistake is not taken for one the maildir cannot serve.
        try:
            formatUidl(args.uidl_format, {letter: "1" for letter in "uvmfg"})
        except ValueError as e:
            raise CommandError(f"bad --uidl-format {args.uidl_format!r}: {e}", EX_USAGE)
    address = _address(args.address)
    _importTarget(store, address)
    try:
        report = importMaildir(
            store, args.directory, address, args.uidl_format, int(time.time()),
            progress=lambda line: args.stderr.write(f"mailgate: {line}\n"), uidListPath=args.uidlist,
        )
    except ImportFailed as e:
        raise CommandError(str(e), EX_NOINPUT)
    _importReport(report, out, args.stderr)
    if report.interrupted:
        # The database, not the maildir: the run can simply be repeated.
        raise CommandError("the import was interrupted; run it again to finish", EX_TEMPFAIL)
    if report.failures:
        raise CommandError(f"{len(report.failures)} messages could not be imported; run it again once fixed", EX_DATAERR)


def _addHashed(parser):
    parser.add_argument(
        "--hashed",
        action="store_true",
        help="what is read is a password hash another server made, as Dovecot writes it "
        "({SHA512-CRYPT}$6$..., {BLF-CRYPT}..., a bare $6$... crypt string, ...): kept, and "
        "replaced by mailgate's own at the user's first login",
    )


def _readUsers(path, passwords=True):
    """
    C{(address, password)} per line of a C{--users} file: the address, a
    space, and the password (the rest of the line); empty lines and lines
    starting with C{#} are skipped.

    @param passwords: whether lines have passwords; without (a master
        user logs in for everyone), a line is an address alone, and
        C{password} is C{None}.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}", EX_NOINPUT)
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise CommandError(f"{path} line {line}: not UTF-8 text", EX_DATAERR)
    users = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        address, _, password = line.strip().partition(" ")
        if passwords and not password:
            raise CommandError(f"{path} line {number}: expected ADDRESS PASSWORD", EX_DATAERR)
        if not passwords and password:
            raise CommandError(
                f"{path} line {number}: expected an ADDRESS alone (the master user's password "
                f"serves every user)", EX_DATAERR,
            )
        users.append((_address(address), password or None))
    return users


def _pop3URL(url, parseURL, ImportFailed):
    """
    The parts of an import's source URL, as L{parseURL} finds them, or a
    usage error: for what it refuses, what L{urllib.parse} cannot split
    (C{pop3://[::1}) and port 0, which it would take for "no port".
    """
    from urllib.parse import urlsplit

    try:
        parts = parseURL(url)
        port = urlsplit(url).port
    except ImportFailed as e:
        raise CommandError(str(e), EX_USAGE)
    except ValueError as e:
        raise CommandError(f"bad URL {url!r}: {e}", EX_USAGE)
    if port == 0:
        raise CommandError(f"bad port in {url!r}: 0", EX_USAGE)
    return parts


def _masterRefused(address, master, refusal):
    """
    The end of an import through a master user whose first login was
    refused: with a wrong master password or separator every login would
    be, each after the source's delay for failed logins (Dovecot's grows to
    15 seconds), hours of refusals for a few thousand users, ending in a
    "run it again" that could not help.
    """
    return CommandError(
        f"{address}: {refusal}; stopped: no login through the master user {master} has worked yet, "
        f"and with a wrong master password or --master-separator (the source's "
        f"auth_master_user_separator) every one would be refused; check them (or, if the source "
        f"has no {address}, take it off the list) and run the import again",
        EX_NOPERM,
    )


def _importPOP3(store, args, out, stdin):
    from mailgate.importers import ImportFailed, ImportReport
    from mailgate.importers.pop3 import LoginRefused, SourceBusy, importPOP3, parseURL

    urlUser = _pop3URL(args.url, parseURL, ImportFailed)[3]
    master = args.master_user
    if master is not None:
        if urlUser is not None:
            raise CommandError("with --master-user, each user logs in through it: no user in the URL", EX_USAGE)
        if not master.strip() or not args.master_separator or any(c.isspace() for c in master):
            raise CommandError("--master-user and --master-separator must be words", EX_USAGE)
        if len(args.master_separator) != 1 or args.master_separator.isspace():
            # Dovecot's auth_master_user_separator is one character: the
            # source would split "alice**migrator" at the first.
            raise CommandError("--master-separator is one character, as Dovecot's", EX_USAGE)
    elif args.master_separator != "*":
        raise CommandError("--master-separator goes with --master-user", EX_USAGE)
    if args.users is not None:
        if args.address is not None:
            raise CommandError("give either ADDRESS or --users FILE, not both", EX_USAGE)
        if urlUser is not None:
            raise CommandError("with --users, each user logs in as its ADDRESS: no user in the URL", EX_USAGE)
        users = _readUsers(args.users, passwords=master is None)
    else:
        if args.address is None:
            raise CommandError("give the ADDRESS to import into (or --users FILE)", EX_USAGE)
        users = [(_address(args.address), None)]
    maxSize = _number(args.max_message_size, parseSize, "--max-message-size", minimum=1)
    total = ImportReport()
    failedUsers = []
    masterPassword = None
    # Whether a user's mail came through the master user in this run.
    masterWorks = False
    for address, password in users:
        try:
            _importTarget(store, address)
            login = None
            if master is not None:
                # Dovecot's master users: "alice@example.org*migrator"
                # logs in as alice with the master user's password.
                if args.master_separator in address:
                    # The source splits the login at the first one.
                    raise CommandError(
                        f"the address has the master separator {args.master_separator!r} in it, where "
                        f"the source would split the login; import it with its own password",
                        EX_DATAERR,
                    )
                if masterPassword is None:
                    masterPassword = _readPassword(args, stdin, confirm=False)
                password, login = masterPassword, f"{address}{args.master_separator}{master}"
            elif password is None:
                password = _readPassword(args, stdin, confirm=False)
            # With --users, a warning names its user, as the failures do.
            who = f"{address}: " if args.users is not None else ""
            report = importPOP3(
                store, args.url, address, password, user=login, insecure=args.insecure, delete=args.delete,
                warn=lambda line, who=who: args.stderr.write(f"mailgate: {who}{line}\n"), maxSize=maxSize,
            )
        except (CommandError, ImportFailed) as e:
            if args.users is None:
                raise CommandError(str(e), getattr(e, "code", EX_UNAVAILABLE))
            if master is not None and not masterWorks and isinstance(e, LoginRefused):
                raise _masterRefused(address, master, e) from None
            # A maildrop in use ([IN-USE], or [LOGIN-DELAY]) answers a
            # login that was right; [SYS/TEMP] may come before any check.
            masterWorks = masterWorks or (isinstance(e, SourceBusy) and "[SYS/TEMP]" not in str(e).upper())
            args.stderr.write(f"mailgate: {address}: {e}\n")
            failedUsers.append(address)
            out.write(f"{address}: failed\n")
            out.flush()
            continue
        masterWorks = True
        _importReport(report, out, args.stderr, address if args.users is not None else None)
        # The progress of a long run, as it goes: through a pipe (tee, a
        # log), the lines would wait for the end, or be lost with a kill.
        out.flush()
        if report.failures:
            failedUsers.append(address)
        total.add(report)
    if args.users is not None:
        incomplete = f"; {len(failedUsers)} of the users not complete" if failedUsers else ""
        out.write(f"{len(users)} users: {total.summary()}{incomplete}\n")
    if failedUsers or total.failures:
        raise CommandError(
            f"the import of {', '.join(failedUsers)} did not complete; run it again to finish",
            EX_TEMPFAIL,
        )


def _userRename(store, args, out, stdin):
    old, new = _address(args.old), _address(args.new)
    if old == new:
        _existingUser(store, old)
        raise CommandError(f"OLD and NEW are the same address, {old}: nothing to rename", EX_USAGE)
    try:
        _forUser(old, store.renameUser(old, new))
    except UserExists:
        raise CommandError(f"user {new} already exists", EX_CANTCREAT)
    except MaildropInUse:
        raise _inSession(old)
    out.write(f"renamed {old} to {new}; the maildrop, its unique ids and quota follow\n")


def _mailboxExpunge(store, args, out, stdin):
    address = _address(args.address)
    days = None if args.all else _number(args.older_than, _dayCount, "--older-than")
    try:
        removed = _forUser(address, store.expungeMessages(address, days))
    except MaildropInUse:
        raise _inSession(address)
    what = "every message" if args.all else f"messages older than {days} days"
    out.write(f"removed {removed} messages ({what}) from {address}\n")


def _who(store, args, out, stdin):
    sessions = _result(store.listSessions())
    if args.json:
        return _jsonLines(out, (
            {"user": s.address, "node": s.node, "client": s.peer, "since": _time(s.since)} for s in sessions
        ))
    out.write(f"{'USER':<40} {'NODE':<30} {'CLIENT':<24} SINCE\n")
    for session in sessions:
        out.write(
            f"{session.address:<40} {session.node:<30} {session.peer or '-':<24} {_time(session.since)}\n"
        )


#: seconds C{mailgate kick} looks for a session it did not find at once
KICK_LOOK_AGAIN = 2.5


def _kick(store, args, out, stdin):
    address = _address(args.address)
    wait = _number(args.wait, _seconds, "--wait")
    _existingUser(store, address)
    # A session that logged in a moment ago appears in the registry with
    # its node's next write (about a second): look again for a little
    # while before saying there is none.
    lookUntil = time.monotonic() + KICK_LOOK_AGAIN
    while not _result(store.kickSessions(address)):
        if time.monotonic() >= lookUntil:
            raise CommandError(f"{address} has no POP3 session in progress", 1)
        time.sleep(0.25)
    # The node serving the session looks for the mark about once a second.
    # Only the marked sessions are waited for: a client that logs in again
    # at once (they do) has a new session, which was not asked to end.
    deadline = time.monotonic() + wait
    while True:
        if not _result(store.listSessions(address, kicked=True)):
            out.write(f"ended the POP3 session of {address}; nothing it deleted was removed\n")
            return
        if time.monotonic() >= deadline:
            raise CommandError(
                f"asked the node to end the POP3 session of {address}; it has not ended yet", EX_TEMPFAIL
            )
        time.sleep(0.2)


def _time(seconds):
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _sender(text):
    """
    The envelope sender of C{deliver -f}, checked as SMTP's MAIL FROM
    checks it (it goes into the Return-Path: field): a mailbox, with or
    without its angle brackets, or the null sender (C{''} or C{<>}).
    """
    from mailgate.smtp.syntax import MAX_PATH, EnvelopeSyntaxError, checkMailbox

    inside = text[1:-1] if text.startswith("<") and text.endswith(">") else text
    if not inside:
        return ""
    try:
        if len(inside) > MAX_PATH:
            raise EnvelopeSyntaxError("address too long")
        return checkMailbox(inside, utf8=True, maxLocalPart=None)
    except EnvelopeSyntaxError as e:
        raise CommandError(f"bad sender {text[:60]!r}: {e}", EX_DATAERR) from None


def _deliver(store, args, out, stdin):
    addresses = []
    for text in args.addresses:
        try:
            addresses.append(normalizeAddress(text))
        except InvalidAddress as e:
            raise CommandError(str(e), EX_NOUSER)
    # All or nothing: an unknown recipient fails the delivery before any copy
    # is stored, so the MTA's bounce tells the whole truth.
    sender = None if args.sender is None else _sender(args.sender)
    for address in addresses:
        _existingUser(store, address)
    trace = ()
    if sender is not None:
        # Like the final delivery of SMTP and LMTP: where the message came
        # from, and that mailgate stored it.
        import socket

        from mailgate.smtp.envelope import Envelope, traceHeaders

        envelope = Envelope(helo=None, peer=None, protocol="local", sender=sender, recipients=addresses)
        trace = traceHeaders(envelope, socket.getfqdn())
    source = spoolFile(getattr(stdin, "buffer", stdin), headerLines=trace)
    try:
        # All or nothing, here too: a recipient vanished or over quota
        # since the check above stores nothing for anyone.
        results = _result(store.deliver(addresses, source, partial=False))
    except NoSuchUser as e:
        raise CommandError(f"no such user: {e}", EX_NOUSER)
    except QuotaExceeded as e:
        # Temporary: the MTA keeps the message and retries once the user
        # has made room (Dovecot's default for a full mailbox).
        raise CommandError(f"{e}; try again later", EX_TEMPFAIL)
    finally:
        source.close()
    for address, uniqueId in results.items():
        out.write(f"delivered to {address} as {uniqueId}\n")


def _dbUpgrade(store, args, out, stdin):
    database = store.database
    applied = upgrade(database)
    for migration in applied:
        out.write(f"applied migration {migration.version}: {migration.description}\n")
    out.write(f"schema is at version {LATEST}\n")


def _dbCopy(store, args, out, stdin):
    from mailgate.store.copy import CopyError, copyDatabase

    source = _copySide(args.source, "--from", create=False)
    try:
        target = _copySide(args.target, "--to", create=True)
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


def _copySide(url, option, create):
    """
    The store of one side of C{db copy}, or an error that says which side
    cannot be opened, as C{--database}'s would.
    """
    try:
        return openSynchronousStore(url, create=create)
    except TemporaryFailure as e:
        raise CommandError(f"{option}: temporary failure, try again: {e}", EX_TEMPFAIL) from None
    except ConfigurationError as e:
        raise CommandError(f"{option}: {e}", EX_CONFIG) from None


def _dbVersion(store, args, out, stdin):
    # Read without writing: on a database that is not mailgate's (a
    # mistaken --database), the table of versions is not created.
    version = store.database.run(recordedVersion) or 0
    newer = "; newer than this mailgate: upgrade mailgate" if version > LATEST else ""
    out.write(f"schema version {version} (this mailgate: {LATEST}){newer}\n")


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
        # One line, as twistd mailgate says it (see mailgate.tap.Options).
        stderr.write(f"mailgate serve: {e} (mailgate serve --help lists the options)\n")
        return EX_USAGE
    except SystemExit as e:
        # --help and --version exit 0; a configuration file that cannot be
        # used exits with its one line (see mailgate.tap.Options).
        if isinstance(e.code, str):
            stderr.write(f"{e.code}\n")
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
        raise CommandError(f"not an IP address (nor an IPv6 /64 network): {text!r}", EX_DATAERR)


def _utc(at):
    """
    A time as C{ban} shows it; one no date can hold (a ban stored by an
    older mailgate, which took any length) as its number of seconds.
    """
    try:
        return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return f"{int(at)} (seconds since 1970, past year 9999)"


def _policyStore(store):
    from mailgate.store.policy import SQLPolicyStore

    return SQLPolicyStore(store.database)


def _banList(store, args, out, stdin):
    import time

    bans = _result(_policyStore(store).listBans(time.time()))
    if args.json:
        return _jsonLines(out, (
            {"address": b.address, "reason": b.reason, "failures": b.failures, "expires": _utc(b.expires)}
            for b in bans
        ))
    out.write(f"{'ADDRESS':<39} {'REASON':<14} {'FAILURES':>8}  EXPIRES\n")
    for ban in bans:
        out.write(f"{ban.address:<39} {ban.reason:<14} {ban.failures:>8}  {_utc(ban.expires)}\n")


def _banAdd(store, args, out, stdin):
    import ipaddress
    import time

    from mailgate.policy.addresses import DEFAULT_EXEMPT_NETWORKS

    from mailgate.policy.settings import MAX_BAN_TIME

    address = _banAddress(args.address)
    duration = _number(args.duration, lambda text: parseWhole(text, MAX_BAN_TIME), "--for", minimum=1)
    ban = _result(_policyStore(store).addBan(address, time.time(), duration))
    out.write(f"banned {address} until {_utc(ban.expires)}\n")
    banned = ipaddress.ip_network(address)
    if any(banned.overlaps(ipaddress.ip_network(n)) for n in DEFAULT_EXEMPT_NETWORKS):
        out.write(
            f"note: {address} is in the default --exempt-network; servers exempting it "
            f"do not enforce this ban\n"
        )


def _banDel(store, args, out, stdin):
    from mailgate.policy.addresses import parseAddress

    address = _banAddress(args.address)
    policy = _policyStore(store)
    removed = _result(policy.removeBan(address))
    if "/" not in args.address:
        # A ban stored by an earlier mailgate names the IPv6 address alone.
        single = str(parseAddress(args.address))
        if single != address:
            removed = _result(policy.removeBan(single)) or removed
    if not removed:
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
        "a running server enforces a ban added or lifted here within a second.",
    ).add_subparsers(dest="action", metavar="ACTION")
    ban.required = True
    banList = ban.add_parser("list", help="list the bans in force: address, reason, failures, expiry (UTC)")
    _addJSON(banList)
    banList.set_defaults(run=_banList, migrate=True)
    banAdd = ban.add_parser(
        "add", help="ban an address, an IPv6 one for its whole /64 (replacing a ban it has)"
    )
    banAdd.add_argument("address", metavar="ADDRESS")
    banAdd.add_argument(
        "--for",
        dest="duration",
        default=str(BAN_TIME),
        metavar="SECONDS",
        help=f"how long the ban lasts, at most ten years (default: {BAN_TIME})",
    )
    banAdd.set_defaults(run=_banAdd, migrate=True)
    banDel = ban.add_parser("del", help="lift an address's ban and forget its failed logins")
    banDel.add_argument("address", metavar="ADDRESS")
    banDel.set_defaults(run=_banDel, migrate=True)


def _addJSON(parser):
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line, for scripts, instead of the table",
    )


def buildParser():
    parser = argparse.ArgumentParser(
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
        help="the server's configuration file (twistd mailgate --config FILE): its database is "
        "used, so the URL and its password need not be repeated; the file is checked as the "
        "server checks it",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    user = commands.add_parser("user", help="manage users").add_subparsers(
        dest="action", metavar="ACTION"
    )
    user.required = True
    add = user.add_parser("add", help="add a user")
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument(
        "--apop",
        action="store_true",
        help="also allow APOP; this keeps the password recoverable in the database (see README)",
    )
    _addHashed(add)
    add.set_defaults(run=_userAdd, migrate=True, create=True)
    passwd = user.add_parser("passwd", help="change a user's password")
    passwd.add_argument("address", metavar="ADDRESS")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    _addHashed(passwd)
    passwd.set_defaults(run=_userPasswd, migrate=True)
    imports = user.add_parser(
        "import",
        help="add the users of a Dovecot passwd-file, keeping their passwords",
        description="Add the users of a Dovecot passwd-file (user:{SCHEME}hash:...; '-' reads "
        "standard input), keeping their password hashes: each is replaced by mailgate's own "
        "at the user's first login.  Users already there are left as they are, so the "
        "command can be run again.  SCRAM-SHA-256 works for a user once they have logged "
        "in with their password (at once for Dovecot's {SCRAM-SHA-256} and {PLAIN}).",
    )
    imports.add_argument("file", metavar="PASSWD-FILE")
    imports.add_argument("--domain", help="the domain of user names without one")
    imports.add_argument(
        "--scheme",
        help="the scheme of passwords written without a {SCHEME} prefix, as the passdb's "
        "args = scheme=... says (PLAIN for passwords in clear); crypt(3) strings by default",
    )
    imports.add_argument(
        "--refresh",
        action="store_true",
        help="replace the password of users already there whose password is still the one "
        "imported (they have not logged in to mailgate since) with the file's, for passwords "
        "changed on the old server while the move goes on",
    )
    imports.add_argument(
        "--apop",
        action="store_true",
        help="also allow APOP (and CRAM-MD5) for the users whose password is in clear ({PLAIN}), "
        "as Dovecot did; this keeps it recoverable in the database (see README)",
    )
    imports.set_defaults(run=_userImport, migrate=True, create=True)
    delete = user.add_parser(
        "del",
        help="delete a user and their maildrop",
        description="Delete a user and their maildrop.  Refused while the user is in a POP3 session.",
    )
    delete.add_argument("address", metavar="ADDRESS")
    delete.set_defaults(run=_userDel, migrate=True)
    listing = user.add_parser("list", help="list users")
    _addJSON(listing)
    listing.set_defaults(run=_userList, migrate=True)
    test = user.add_parser(
        "test",
        help="check a user's password without logging in",
        description="Check a user's password as a POP3 login would (as doveadm auth test): exit "
        "0 if it is right, 77 if not.  Nothing is changed, not even an imported hash.",
    )
    test.add_argument("address", metavar="ADDRESS")
    test.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    test.set_defaults(run=_userTest, migrate=True)
    apop = user.add_parser("apop", help="switch APOP on or off for a user")
    apop.add_argument("address", metavar="ADDRESS")
    apop.add_argument("state", choices=["on", "off"])
    apop.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    apop.set_defaults(run=_userApop, migrate=True)
    rename = user.add_parser(
        "rename",
        help="give a user a new address (maildrop, unique ids and quota follow)",
        description="Give a user a new address.  The maildrop, its unique ids, quota and "
        "retention follow; the next login must use the new address, on running servers "
        "too.  Refused while the user is in a POP3 session.",
    )
    rename.add_argument("old", metavar="OLD")
    rename.add_argument("new", metavar="NEW")
    rename.set_defaults(run=_userRename, migrate=True)
    quota = user.add_parser(
        "quota",
        help="set a user's storage quota",
        description="Set a user's storage quota: a size (1G, 500M, 64K or octets), "
        "'none' for no limit, or 'default' for the server's --default-quota.  Mail "
        "already stored is kept whatever the new quota; only new mail is refused.",
    )
    quota.add_argument("address", metavar="ADDRESS")
    quota.add_argument("size", metavar="SIZE|none|default")
    quota.add_argument(
        "--messages", metavar="N|none|default", help="also limit the number of messages"
    )
    quota.set_defaults(run=_userQuota, migrate=True)
    expire = user.add_parser(
        "expire",
        help="set how many days a user's messages are kept",
        description="Set after how many days a user's messages are removed by the "
        "retention task (advertised to the user's POP3 clients as EXPIRE): a number "
        "of days, 'never', or 'default' for the server's --expire-days.",
    )
    expire.add_argument("address", metavar="ADDRESS")
    expire.add_argument("days", metavar="N|never|default")
    expire.set_defaults(run=_userExpire, migrate=True)

    recount = user.add_parser(
        "recount",
        help="count users' storage use again from their messages",
        description="Count each user's storage use (messages and octets, what quotas and user "
        "list go by) again from the messages in the maildrop, and keep that, as doveadm quota "
        "recalc does.  Use is kept with every delivery and removal; a node of a mailgate from "
        "before quotas (schema version 3) that goes on delivering after the upgrade does not "
        "keep it.",
    )
    recount.add_argument("addresses", nargs="*", metavar="ADDRESS")
    recount.add_argument("--all", action="store_true", help="every user")
    recount.set_defaults(run=_userRecount, migrate=True)

    mailbox = commands.add_parser("mailbox", help="list, expunge and restore a user's messages").add_subparsers(
        dest="action", metavar="ACTION"
    )
    mailbox.required = True
    mlist = mailbox.add_parser("list", help="list a user's messages as POP3 numbers them")
    mlist.add_argument("address", metavar="ADDRESS")
    _addJSON(mlist)
    mlist.set_defaults(run=_mailboxList, migrate=True)
    mdeleted = mailbox.add_parser(
        "deleted",
        help="list a user's messages deleted by POP3 and kept for recovery (--keep-deleted-days)",
    )
    mdeleted.add_argument("address", metavar="ADDRESS")
    _addJSON(mdeleted)
    mdeleted.set_defaults(run=_mailboxDeleted, migrate=True)
    mrestore = mailbox.add_parser(
        "restore",
        help="bring back messages deleted by POP3 (kept for --keep-deleted-days)",
        description="Bring back kept deleted messages: those with the given unique ids, "
        "or all of them (optionally only those deleted since TIME).  They come back "
        "under their own unique ids, so that POP3 clients that leave mail on the server "
        "treat them as already downloaded; with --as-new under new ids, so that they "
        "download them again.",
    )
    mrestore.add_argument("address", metavar="ADDRESS")
    mrestore.add_argument("uidls", nargs="*", metavar="UIDL")
    mrestore.add_argument(
        "--since", metavar="TIME", help="only messages deleted since TIME (2024-05-01T10:00:00Z, 2h ago as 2h)"
    )
    mrestore.add_argument("--as-new", action="store_true", help="give them new unique ids")
    mrestore.set_defaults(run=_mailboxRestore, migrate=True)
    mexpunge = mailbox.add_parser(
        "expunge",
        help="remove a user's messages for good (all, or older than DAYS)",
        description="Remove messages from a user's maildrop for good (they are not kept "
        "for mailbox restore).  Refused while the user is in a POP3 session.",
    )
    mexpunge.add_argument("address", metavar="ADDRESS")
    which = mexpunge.add_mutually_exclusive_group(required=True)
    which.add_argument("--older-than", metavar="DAYS", help="messages that arrived more than DAYS days ago")
    which.add_argument("--all", action="store_true", help="every message")
    mexpunge.set_defaults(run=_mailboxExpunge, migrate=True)

    who = commands.add_parser("who", help="list the POP3 sessions in progress on every node")
    _addJSON(who)
    who.set_defaults(run=_who, migrate=True)
    kick = commands.add_parser(
        "kick",
        help="end a user's POP3 session, wherever it runs, without applying its deletions",
    )
    kick.add_argument("address", metavar="ADDRESS")
    kick.add_argument(
        "--wait", default="30", metavar="SECONDS", help="how long to wait for it to end (default 30)"
    )
    kick.set_defaults(run=_kick, migrate=True)

    imports = commands.add_parser(
        "import", help="move maildrops from another server, keeping unique ids"
    ).add_subparsers(dest="action", metavar="ACTION")
    imports.required = True
    imaildir = imports.add_parser(
        "maildir",
        help="import a Maildir (e.g. Dovecot's) into a user's maildrop",
        description="Import a Maildir's messages (cur/ and new/) into a user's maildrop, "
        "in the order Dovecot serves them, with the unique ids it serves (read from "
        "dovecot-uidlist and formatted like Dovecot's pop3_uidl_format).  Safe to run "
        "again: messages already imported are skipped.",
    )
    imaildir.add_argument("directory", metavar="DIR")
    imaildir.add_argument("address", metavar="ADDRESS")
    imaildir.add_argument(
        "--uidl-format",
        metavar="FORMAT",
        help="Dovecot's pop3_uidl_format for this maildir: %%u uid, %%v uidvalidity, "
        "%%f file name, %%g GUID, %%m header MD5 (default %%08Xu%%08Xv, or %%f without "
        "a dovecot-uidlist)",
    )
    imaildir.add_argument(
        "--uidlist",
        metavar="FILE",
        help="the maildir's dovecot-uidlist, where Dovecot keeps it outside the maildir (CONTROL= in "
        "mail_location, e.g. ~/control/.INBOX/dovecot-uidlist; default: DIR/dovecot-uidlist)",
    )
    imaildir.set_defaults(run=_importMaildir, migrate=True)
    ipop3 = imports.add_parser(
        "pop3",
        help="copy a live POP3 server's maildrop into a user's",
        description="Copy a maildrop from a POP3 server (UIDL, then RETR of each message), "
        "keeping its unique ids.  URL: pop3://user@host:port or pop3s://user@host:port "
        "(a user name containing @ written %40; without one, the ADDRESS).  STLS is used "
        "when offered (a server without it is refused, except on this machine, unless "
        "--insecure); certificates are verified unless --insecure.  Resumable: messages "
        "already imported are skipped.  The source is left untouched unless --delete.",
    )
    ipop3.add_argument("url", metavar="URL")
    ipop3.add_argument("address", nargs="?", metavar="ADDRESS")
    ipop3.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    ipop3.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server's certificate, and send the password to a server "
        "that offers no STLS in the clear (refused otherwise, except to this machine)",
    )
    ipop3.add_argument("--delete", action="store_true", help="delete each message from the source once imported")
    ipop3.add_argument(
        "--max-message-size",
        metavar="SIZE",
        default="50M",
        help="the largest message imported (octets, or with a unit: 100M, 1G); a larger one is "
        "reported and left on the source (default: 50M, the server's own default limit)",
    )
    ipop3.add_argument(
        "--users",
        metavar="FILE",
        help="import many users: one 'ADDRESS PASSWORD' per line, each logging in to the "
        "source as ADDRESS (with --master-user, one ADDRESS per line)",
    )
    ipop3.add_argument(
        "--master-user",
        metavar="NAME",
        help="log in to the source as each user through this master user (Dovecot's master "
        "users: ADDRESS*NAME, with the master user's password), so that no user's own "
        "password is needed",
    )
    ipop3.add_argument(
        "--master-separator",
        metavar="SEP",
        default="*",
        help="what joins the user and the master user, the source's auth_master_user_separator "
        "(default: *)",
    )
    ipop3.set_defaults(run=_importPOP3, migrate=True)

    deliver = commands.add_parser(
        "deliver",
        help="deliver a message from standard input to local users",
        description="Deliver a message from standard input to local users, all or none of "
        "them, for an MTA's pipe transport (give it one recipient at a time, so that an "
        "unknown one bounces alone).  Exit status (sysexits): 0 delivered, 67 no such user (nothing "
        "delivered), 75 a temporary failure (a full mailbox, the database unavailable: the "
        "MTA tries again), 65 a sender SMTP would refuse.",
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
    dbUpgrade.set_defaults(run=_dbUpgrade, migrate=False, create=True)
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
    return DEFAULT_DATABASE, (
        f"--database: none was given, nor $MAILGATE_DATABASE, and the default, {DEFAULT_DATABASE}, "
        "is in the working directory"
    )


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
        if args.config is not None:
            # Before serve's own options, so that a --config of its own wins.
            rest = ["--config", args.config, *rest]
        return _serve(rest, args.database, stdout, stderr)
    delivering = args.run is _deliver
    try:
        url, source = _databaseURL(args, environ)
    except ConfigurationError as e:
        stderr.write(f"mailgate: {e}\n")
        return EX_TEMPFAIL if delivering else EX_CONFIG
    store = None
    try:
        args.stderr = stderr
        if getattr(args, "store", True):
            # Only the commands that start a database from nothing create
            # its file: any other one on a mistyped path would make an
            # empty database and report no users.
            store = openSynchronousStore(url, migrate=args.migrate, create=getattr(args, "create", False))
        args.run(store, args, stdout, stdin)
        # Here rather than at exit, so that a reader gone is seen below.
        stdout.flush()
        return EX_OK
    except CommandError as e:
        stderr.write(f"mailgate: {e}\n")
        return e.code
    except NoSuchDatabase as e:
        stderr.write(f"mailgate: {e} (check {source}; mailgate user add or db upgrade creates it)\n")
        return EX_TEMPFAIL if delivering else EX_CONFIG
    except TemporaryFailure as e:
        stderr.write(f"mailgate: temporary failure, try again: {e}\n")
        return EX_TEMPFAIL
    except ConfigurationError as e:
        # A database that cannot be opened: say whose URL it was.
        where = "" if store is not None or source.startswith("--database") else f"{source}: "
        stderr.write(f"mailgate: {where}{e}\n")
        return EX_TEMPFAIL if delivering else EX_CONFIG
    except MailgateError as e:
        stderr.write(f"mailgate: {e}\n")
        return EX_TEMPFAIL if delivering else EX_SOFTWARE
    except KeyboardInterrupt:
        stderr.write("mailgate: interrupted\n")
        return 130
    except Exception as e:
        if isinstance(e, BrokenPipeError) and _readerGone(stdout):
            # mailgate mailbox list ... | head: nothing failed.  deliver
            # writes only once the message is stored: a retry would store
            # it twice.
            return EX_OK if delivering else EXIT_READER_GONE
        stderr.write(f"mailgate: internal error: {e.__class__.__name__}: {e}\n")
        return EX_TEMPFAIL if delivering else EX_SOFTWARE
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
