# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate user ...}: adding, changing and removing users, their passwords
(kept, or as another server hashed them), quotas and retention.
"""

import itertools
import re
import unicodedata

from mailgate.address import asciiDomain, normalizeDomain
from mailgate.auth.foreign import CLEARTEXT, UnusableHash, checksScheme, splitScheme
from mailgate.auth.md5state import hmacMD5Context
from mailgate.auth.passwords import (
    StoredCredentials,
    checkImportable,
    importedHash,
    importedCredentials,
    makeCredentials,
    needsUpgrade,
    verifyPassword,
)
from mailgate.cli import audit
from mailgate.cli.common import (
    CommandError,
    EX_CANTCREAT,
    EX_DATAERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_NOUSER,
    EX_TEMPFAIL,
    EX_USAGE,
    _addHashed,
    _addJSON,
    _addPasswordStdin,
    _address,
    _checkNewPassword,
    _checkPasswordSource,
    _dayCount,
    _domainNote,
    _existingUser,
    _clientAddress,
    _forUser,
    _givenHash,
    _hashKept,
    _inSession,
    _jsonLines,
    _limit,
    _limitValue,
    _messageCount,
    _networksArgument,
    _networksChanged,
    _networksSaid,
    _number,
    _readAddresses,
    _readPassword,
    _result,
    _seconds,
    _shown,
    _time,
    _warnIfFull,
)
from mailgate.cli.sessions import endSessions, masterNote
from mailgate.errors import AliasExists, InvalidAddress, MaildropInUse, UserDisabled, UserExists
from mailgate.importers.passwdfile import RefusedLine, readPasswdFile
from mailgate.store.bounds import MAX_MESSAGES, MAX_SIZE, ZERO_DAYS, ZERO_QUOTA, parseSize
from mailgate.store.limits import DEFAULT, UNLIMITED, describeLimit
from mailgate.store.paging import LISTING_PAGE
from mailgate.store.sql import IMPORT_BATCH
from mailgate.plural import counted, noun
from mailgate.printable import leftAligned, printable


def _credentials(args, password, apop, cramMD5=False):
    """
    What the store keeps for what was read: a password, or with
    C{--hashed} a hash another server made (Dovecot's C{{SCHEME}...}).

    @param cramMD5: keep HMAC-MD5's states for CRAM-MD5 (a user who came
        from Dovecot with them keeps CRAM-MD5 through a new password).
    """
    if not args.hashed:
        _checkNewPassword(password)
        return makeCredentials(password, apop=apop, cramMD5=cramMD5)
    if apop:
        raise CommandError("APOP needs the password itself, not a hash", EX_USAGE)
    return _givenHash(password, cramMD5=cramMD5)


def _userAddOptions(args):
    if args.hashed and args.apop:
        raise CommandError("APOP needs the password itself, not a hash", EX_USAGE)
    _passwordOptions(args)
    # The password (or hash) too, before the database is opened: one
    # refused (empty, not UTF-8, too long, a hash that is none) left the
    # SQLite file it was to go into made, an empty database under what
    # may be a mistyped --database, which commands then took for one.
    args.credentials = _credentials(args, _readPassword(args, args.stdin), args.apop)


def _passwordOptions(args):
    """
    The C{readOptions} part of a command that reads a password: that it
    can be read (L{_checkPasswordSource}); C{user apop ... off} reads none.
    """
    if getattr(args, "state", "on") == "on":
        _checkPasswordSource(args, args.stdin)


def _userAdd(store, args, out, stdin):
    address = args.address
    try:
        _result(store.addUser(address, args.credentials))
    except UserExists:
        raise CommandError(f"user {address} already exists", EX_CANTCREAT)
    except AliasExists as e:
        raise CommandError(_aliasTaken(e), EX_CANTCREAT)
    out.write(f"added {address}{' (APOP enabled)' if args.apop else ''}\n")
    out.write(_domainNote(args, address))
    audit.outcome(args, f"added{_audited(args)}")


def _aliasTaken(refusal):
    """
    The refusal of an address that is an alias (L{AliasExists}) as a
    user's.
    """
    return (
        f"{refusal.address} is an alias of {refusal.target}: an address is a user's or an alias "
        f"(mailgate alias del {refusal.address} first)"
    )


def _audited(args, apop=None):
    """
    How a password was set, for the audit line: which was given (never
    the password, nor its hash).
    """
    said = ["a password hash given"] if args.hashed else []
    if args.apop if apop is None else apop:
        said.append("APOP enabled")
    return f" ({', '.join(said)})" if said else ""


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


def _staleImport(store, address, credentials, user=None):
    """
    The stored hash of a user imported before, if it still is the one
    imported (they have not logged in to mailgate since) and is not the
    one the passwd-file has now (they changed their password on the old
    server while the move went on); else C{None}.

    @param user: the user as looked up already, or C{None} to look them up.
    """
    if user is None:
        user = _result(store.findUser(address))
    if user is None or not needsUpgrade(user.passwordHash) or user.passwordHash == credentials.passwordHash:
        return None
    return user.passwordHash


def _hashedInClear(account, user):
    """
    Whether C{account}'s line has its password in clear (C{{PLAIN}}) and
    C{user} has mailgate's own hash: made of it at the import (or at a
    login since).  A newer password in the file cannot be told from that
    hash but by a check costing a quarter of a second of scrypt a user
    (hours for a large site's file), so C{--refresh} leaves it, and says
    so (it did not: the line said C{exists} alone, and a password
    changed on the old server while the move went on stayed the old one
    here without a word).
    """
    if user is None or needsUpgrade(user.passwordHash):
        return False
    try:
        scheme, _, _ = splitScheme(account.password)
    except UnusableHash:
        return False
    return scheme in CLEARTEXT


def _userImportOptions(args):
    """
    C{user import}'s C{--scheme} and C{--domain}, read before the database
    is opened (and made, which this command does): C{args.domain} becomes
    the domain in its normalised ASCII form.
    """
    # Dovecot's passwd-file passdb reads a password without a {SCHEME}
    # prefix in the scheme its args give (scheme=PLAIN), CRYPT by default.
    scheme = args.scheme
    if scheme is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", scheme):
        raise CommandError(f"--scheme {scheme!r} is not a scheme's name (PLAIN, SHA512-CRYPT...)", EX_USAGE)
    if scheme is not None and not checksScheme(scheme):
        # Else each line without a {SCHEME} prefix failed, the database
        # made first.
        raise CommandError(f"--scheme {scheme!r} is not a scheme mailgate checks (PLAIN, SHA512-CRYPT...)", EX_USAGE)
    domain = None
    if args.domain is not None:
        try:
            # In Unicode, its ASCII form, as an ADDRESS argument's domain.
            domain = normalizeDomain(asciiDomain(args.domain) or args.domain)
        except InvalidAddress as e:
            raise CommandError(str(e), EX_USAGE) from None
    args.domain = domain
    # The file too (standard input, -, is read once the database is
    # opened): one that cannot be read made the database first.
    if args.file == "-" and args.stdin is None:
        raise CommandError("cannot read -: standard input is closed", EX_NOINPUT)
    args.lines = None if args.file == "-" else _passwdFileLines(args.file)


def _passwdFileLines(path):
    """
    The lines of the passwd-file at C{path}.  Octets that are not UTF-8
    (a gecos field in Latin-1, copied from an old /etc/passwd) are kept
    as they are, and refuse only a line whose name or hash has some; the
    byte order mark an editor may put first is not part of the first
    user's name.
    """
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
            return f.read().splitlines()
    except OSError as e:
        raise CommandError(f"cannot read {_shown(path)}: {e.strerror}", EX_NOINPUT)


def _userImport(store, args, out, stdin):
    """
    Add the users of a Dovecot passwd-file, keeping their password hashes
    (replaced by mailgate's own at each user's first login).  Users that
    exist already are left as they are, so a run can be repeated; with
    C{--refresh}, those still with an imported hash take the file's, and
    those the file now disables (its C{nologin} or C{fail}) are disabled.
    """
    scheme, domain = args.scheme, args.domain
    # The path as given, in every line that names it (a line break in it
    # would start a line of its own).
    shownFile = _shown(args.file)
    try:
        if args.file == "-":
            if stdin is None:
                raise CommandError("cannot read -: standard input is closed", EX_NOINPUT)
            # Its octets, as a file's are read: not in the locale's
            # encoding, whose strict decoding failed at the first octet
            # that is not UTF-8 (an internal error, exit 70).
            binary = getattr(stdin, "buffer", None)
            text = stdin.read() if binary is None else binary.read().decode("utf-8-sig", "surrogateescape")
            lines = text.splitlines()
        else:
            # Read before the database was opened (_userImportOptions).
            lines = args.lines
    except OSError as e:
        raise CommandError(f"cannot read {shownFile}: {e.strerror}", EX_NOINPUT)
    added = updated = present = failed = 0
    # With --refresh, the users there whose password was in clear: theirs
    # is not compared (_hashedInClear).
    unrefreshed = []
    # Users not there yet wait here, to be added IMPORT_BATCH at a time in
    # one transaction (store.addUsers): a commit each took half of a first
    # run's time (three transactions a user: 50,000 users in 122 s on
    # SQLite, 170 s on PostgreSQL).  Each line's outcome is printed in the
    # file's order: the users waiting are added before any other line is
    # printed.
    pending = []
    adding = [0]
    # The domains of the users added, for the note on those the server's
    # configuration does not take mail for.
    addedDomains = set()

    def refused(account, e):
        nonlocal failed
        if e.code == EX_TEMPFAIL:
            raise e
        failed += 1
        args.stderr.write(f"mailgate: {shownFile} line {account.number}: {e}\n")

    def there(account, address, credentials, user=None):
        # There before (user: as looked up), or added meanwhile by another
        # command (looked up now).
        nonlocal updated, present
        hints = []
        try:
            target = None if user is not None else _result(store.findAlias(address))
            if target is not None:
                # Not a user's: an alias's (mailgate alias add), which the
                # batch refused as taken.  The line's user, and their
                # mail, are not there: said as the failure it is.
                raise CommandError(_aliasTaken(AliasExists(address, target)), EX_CANTCREAT)
            stale = None if credentials is None else _staleImport(store, address, credentials, user)
            changed = stale is not None and args.refresh and _result(
                # Over the hash read just now only: a first login
                # meanwhile wins.
                store.upgradeCredentials(address, stale, credentials)
            )
            if changed:
                out.write(f"updated {address}\n")
            elif stale is not None and not args.refresh:
                hints.append("its imported password is not the file's")
            if account.disabled is not None and _enabled(store, address):
                # Disabled on the old server since the last run (nologin,
                # fail): its logins here are refused too, as Dovecot's
                # are, whether or not the user has logged in here since.
                # The other way (a line without it now) is the
                # administrator's call: user enable.
                if args.refresh:
                    reason = _importedReason(account.disabled)
                    _result(store.disableUser(address, reason or None))
                    changed = True
                    out.write(
                        f"disabled {address} (as Dovecot's {account.refusedBy} has it now"
                        f"{f': {reason}' if reason else ''})\n"
                    )
                else:
                    hints.append(f"Dovecot's {account.refusedBy} has it disabled, not here")
            if changed:
                updated += 1
                return
        except CommandError as e:
            refused(account, e)
            return
        present += 1
        hint = f" ({'; '.join(hints)}: --refresh)" if hints else ""
        if args.refresh and _hashedInClear(account, user):
            unrefreshed.append(address)
        out.write(f"exists {address}{hint}\n")

    def addPending():
        nonlocal added
        if not pending:
            return
        batch = pending[:]
        del pending[:]
        adding[0] = len(batch)
        news = _result(store.addUsers([(address, credentials, quota) for _, address, credentials, quota, _ in batch]))
        for (account, address, credentials, quota, apop), new in zip(batch, news):
            # Until said, one of those that may or may not be added.
            adding[0] -= 1
            if not new:
                there(account, address, credentials)
                continue
            added += 1
            addedDomains.add(address.rpartition("@")[2])
            out.write(f"added {address}{apop}\n")
            if account.unkept:
                # Imported all the same (its mail must move), but no longer
                # kept to its networks: said, for the administrator to judge.
                args.stderr.write(
                    f"mailgate: {shownFile} line {account.number}: {address}: {' '.join(account.unkept)} not kept "
                    f"(mailgate checks the client's address, allow_nets, not a proxy's)"
                    f"{'' if account.networks else ': it logs in from any address here'}\n"
                )

    def lookedUp(accounts):
        # Each account with its user (None: not there), looked up
        # IMPORT_BATCH lines at a time in one statement (store.findUsers),
        # not in a transaction a line (on PostgreSQL three round trips
        # each: 50,000 users there already took 5.8 s, 1.7 s now).  A user
        # added meanwhile by another command is found by the batch that
        # adds them (False: "exists").
        while chunk := list(itertools.islice(accounts, IMPORT_BATCH)):
            found = _result(store.findUsers([a.address for a in chunk if not isinstance(a, RefusedLine)]))
            for account in chunk:
                yield account, None if isinstance(account, RefusedLine) else found.get(account.address)

    try:
        for account, user in lookedUp(readPasswdFile(lines, domain, scheme)):
            try:
                if isinstance(account, RefusedLine):
                    raise CommandError(account.reason, EX_DATAERR)
                address = account.address
                # A user there already (the command run again) is looked up
                # first: no write for them (on SQLite, the server's one write
                # lock); where their hash is mailgate's own already (they
                # logged in since, or came in clear) no hash of a password in
                # clear made for nothing (checkImportable), for nothing in the
                # file replaces theirs; and where it is the file's hash, as
                # imported, not checked again (a crypt string's check runs it
                # once: some 3 ms for SHA512-CRYPT, 150 s of 50,000 users).
                credentials = None
                imported = user is not None and needsUpgrade(user.passwordHash)
                try:
                    if user is None or (imported and user.passwordHash != importedHash(account.password)):
                        credentials = importedCredentials(account.password, apop=args.apop)
                    elif not imported:
                        checkImportable(account.password)
                except UnusableHash as e:
                    raise CommandError(f"{address}: unusable password hash: {e}", EX_DATAERR) from None
                quota = _storedQuota(address, account.quota)
                if account.disabled is not None:
                    # nologin or fail: imported disabled, in the
                    # transaction that adds the user.
                    quota["disabled"] = _importedReason(account.disabled)
                if account.networks is not None:
                    # allow_nets: the user's networks, in the transaction
                    # that adds the user.
                    quota["networks"] = account.networks
            except CommandError as e:
                if e.code == EX_TEMPFAIL:
                    raise
                addPending()
                refused(account, e)
                continue
            if user is None:
                apop = " (APOP enabled)" if credentials.apopSecret is not None else ""
                if credentials.cramMD5 is not None:
                    apop = " (CRAM-MD5 enabled)"
                if account.disabled is not None:
                    reason = quota["disabled"]
                    apop += f" (disabled, as Dovecot's {account.refusedBy} had it{f': {reason}' if reason else ''})"
                if account.networks is not None:
                    apop += f" (from {account.networks} only, as Dovecot's allow_nets had it)"
                pending.append((account, address, credentials, quota, apop))
                if len(pending) >= IMPORT_BATCH:
                    addPending()
                continue
            addPending()
            there(account, address, credentials, user)
        addPending()
    except BaseException:
        # Stopped (Ctrl-C, the database lost): the users said to be added
        # are; those read after them are not, and the ones being added
        # at that moment are or are not, all together.
        if added or pending or adding[0]:
            audit.outcome(args, f"stopped after adding {counted(added, 'user')}")
            inFlight = (
                f"; the {counted(adding[0], 'user')} being added when it stopped may or may not be"
                if adding[0] else ""
            )
            args.stderr.write(
                f"mailgate: stopped after adding {counted(added, 'user')} of {shownFile} (said above){inFlight}: "
                "run the command again to import the rest (users there are left as they are)\n"
            )
        raise
    refreshed = f"{updated} updated, " if args.refresh else ""
    out.write(f"{added} added, {refreshed}{present} already there, {failed} failed\n")
    if unrefreshed:
        args.stderr.write(
            f"mailgate: {counted(len(unrefreshed), 'user')} there ({unrefreshed[0]}"
            f"{', ...' if len(unrefreshed) > 1 else ''}) had their password in clear in {shownFile}: hashed when "
            f"imported, it is mailgate's own, which --refresh leaves, as for a user who has logged in here; give "
            f"those whose password changed on the old server the new one with mailgate user passwd\n"
        )
    for domain in sorted(addedDomains):
        out.write(_domainNote(args, f"@{domain}", "its users"))
    audit.outcome(args, f"{added} added, {refreshed}{present} already there, {failed} failed")
    if failed:
        raise CommandError(f"{counted(failed, 'line')} of {shownFile} not imported", EX_DATAERR)


def _enabled(store, address):
    """
    Whether the user C{address} is there and not disabled.
    """
    summary = _result(store.userSummary(address))
    return summary is not None and summary.disabledAt is None


def _importedReason(text):
    """
    The reason of a passwd-file's disabled account (its C{reason} extra
    field), as kept: what L{_disabledReason} keeps of a C{--reason},
    anything unprintable as C{?} and cut to its length rather than
    refused (the line is imported all the same).
    """
    return printable(" ".join(text.split())[: UserDisabled.REASON_MAX])


def _userPasswd(store, args, out, stdin):
    address = args.address
    user = _existingUser(store, address)
    password = _readPassword(args, stdin)
    if args.hashed and user.apopSecret is not None:
        raise CommandError(f"{address} has APOP, which needs the password itself, not a hash", EX_USAGE)
    credentials = _credentials(args, password, user.apopSecret is not None, user.cramMD5 is not None)
    if user.cramMD5 is not None and credentials.cramMD5 is None:
        raise CommandError(
            f"{address} has CRAM-MD5 (from Dovecot), which needs the password itself or a {{CRAM-MD5}} hash, "
            f"not a hash of another scheme; or turn it off first (user apop {address} off)",
            EX_USAGE,
        )
    _setCredentialsOf(store, user, credentials)
    out.write(f"password changed for {address}\n")
    audit.outcome(args, f"password changed{_audited(args, apop=False)}")


def _setCredentialsOf(store, user, credentials):
    """
    Give C{user} (as looked up by its address) C{credentials}, made from
    what it had then (its hash, kept by C{user apop}; whether it has APOP
    and CRAM-MD5, kept by C{user passwd}), only if its address still has
    that password hash.  Between the look-up and this write (the password
    typed at the terminal meanwhile) the user may have been deleted, or
    renamed and the address given to another user: written by address,
    the other user got the first one's hash (C{user apop}: the first
    user's password opened the second's mailbox, whose own no longer
    did), and a user gone was C{internal error}, exit 70.

    @raise CommandError: no user has the address now (67); its password
        changed, or another user has it, meanwhile (75: nothing changed,
        run the command again, which looks it up afresh).
    """
    address = user.address
    if _result(store.upgradeCredentials(address, user.passwordHash, credentials)):
        return
    if _result(store.findUser(address)) is None:
        raise CommandError(f"no such user: {address} (deleted or renamed meanwhile)", EX_NOUSER)
    raise CommandError(
        f"the user {address} changed meanwhile (its password changed, or the user was renamed or deleted and "
        "the address given to another); nothing was changed: run the command again",
        EX_TEMPFAIL,
    )


def _keepTyped(*names, then=None):
    """
    A C{readOptions} that keeps each address argument as it was typed
    (C{args.NAME_typed}) before L{_readAddresses} normalises it: see
    L{_storedAsTyped}.
    """
    reading = _readAddresses(*names, then=then)

    def readOptions(args):
        for name in names:
            setattr(args, f"{name}_typed", getattr(args, name))
        reading(args)

    return readOptions


def _storedAsTyped(store, args, name):
    """
    The user C{args.NAME} names: its normal form, or where no user has
    that, a stored address written as the administrator typed it (in NFC,
    or lower-cased by C{str.lower} alone, as c05fd1c's mailgate stored
    UTF-8 names: C{νικοσ.παπας@}, C{i̇lker@}, an i and a combining dot).
    Stored so, no login, mail or command reached them once their normal
    form changed (364be6e), not even to delete them; C{db check} lists
    them, and C{user rename} and C{user del} take them as stored.  An
    address typed in its normal form costs no second lookup.
    """
    address = getattr(args, name)
    typed = getattr(args, f"{name}_typed", address).strip()
    if typed == address or _result(store.findUser(address)) is not None:
        return address
    local, _, domain = typed.rpartition("@")
    for candidate in _olderForms(local, address.rpartition("@")[2]):
        if candidate != address and _result(store.findUser(candidate)) is not None:
            setattr(args, name, candidate)
            return candidate
    return address


def _olderForms(local, domain):
    """
    The forms a local part typed so may be stored in by an older mailgate:
    as typed (in NFC), and lower-cased by C{str.lower} alone.
    """
    typed = unicodedata.normalize("NFC", local)
    return dict.fromkeys(
        f"{form}@{domain}" for form in (typed, unicodedata.normalize("NFC", typed.lower()))
    )


def _userDel(store, args, out, stdin):
    address = _storedAsTyped(store, args, "address")
    done = [(0, 0)]

    def progress(removed, kept):
        done[0] = (removed, kept)

    # Said once the user is gone: mail to them is refused from then on,
    # which an administrator deleting a user may not have thought of.
    aliases = [a.alias for a in _forUser(address, store.listAliases(address))]
    try:
        _forUser(address, store.deleteUser(address, progress=progress))
    except BaseException as e:
        # The maildrop is emptied a few hundred messages at a time before
        # the user goes: stopped half-way, what is gone is gone, and said.
        removed, kept = done[0]
        if removed or kept:
            args.stderr.write(
                f"mailgate: stopped after removing {counted(removed, 'message')} and {kept} kept deleted "
                f"{noun(kept, 'message')} of {address}, who is not deleted: run the command again to delete "
                "them\n"
            )
            audit.outcome(
                args, f"removed {counted(removed, 'message')} and {kept} kept deleted {noun(kept, 'message')}, "
                "not deleted"
            )
        if isinstance(e, MaildropInUse):
            raise _inSession(address) from None
        raise
    out.write(f"deleted {address} and their maildrop\n")
    if aliases:
        out.write(
            f"{noun(len(aliases), 'their alias', 'their aliases')} {', '.join(aliases)} went with them: "
            f"mail to {noun(len(aliases), 'it', 'them')} is refused from now on\n"
        )
    also = f" and {counted(len(aliases), 'alias', 'aliases')}" if aliases else ""
    audit.outcome(args, f"deleted, with their maildrop{also}")


def _userList(store, args, out, stdin):
    # In code point order (addresses are ASCII: byte order, LC_ALL=C sort's)
    # whatever the collation of a PostgreSQL database: one made with
    # an ICU or en_US.UTF-8 collation puts a_b before a-c before a+b,
    # SQLite a+b before a-c before a_b: a script comparing lists (comm,
    # join) would see users out of order, and move after a db copy.
    # The database orders them so (not sorted here), and they are read and
    # printed a page at a time: 50,000 users read whole took 15 MB of the
    # command's memory.
    users = _result(store.listUsers(page=LISTING_PAGE))
    if args.json:
        return _jsonLines(out, (
            {
                "address": user.address,
                "messages": user.messages,
                "octets": user.octets,
                "apop": bool(user.apop),
                "cram_md5": bool(user.apop or user.cramMD5),
                "password": "imported" if user.passwordImported else "mailgate",
                "quota_octets": _limitValue(user.quotaOctets),
                "quota_messages": _limitValue(user.quotaMessages),
                "expire_days": _limitValue(user.expireDays, "days"),
                "last_login": None if user.lastLogin is None else _time(user.lastLogin),
                "disabled": user.disabledAt is not None,
                "disabled_since": None if user.disabledAt is None else _time(user.disabledAt),
                "disabled_reason": None if user.disabledAt is None else user.disabledReason,
                "allowed_networks": None if user.allowedNetworks is None else user.allowedNetworks.split(","),
            }
            for user in users
        ))
    out.write(
        f"{'ADDRESS':<40} {'MESSAGES':>8} {'OCTETS':>12}  APOP {'QUOTA':>8} {'MAX-MSGS':>8} {'EXPIRE':<6} "
        f"{'LAST-LOGIN':<20} {'NETWORKS':<18} DISABLED\n"
    )
    for user in users:
        out.write(
            f"{leftAligned(user.address, 40)} {user.messages:>8} {user.octets:>12}  "
            f"{'on' if user.apop else 'cram' if user.cramMD5 else 'off':<4} {describeLimit(user.quotaOctets, 'octets'):>8} "
            f"{describeLimit(user.quotaMessages):>8} {describeLimit(user.expireDays, 'days'):<6} "
            f"{'never' if user.lastLogin is None else _time(user.lastLogin):<20} "
            f"{user.allowedNetworks or 'any':<18} {_disabledShown(user)}\n"
        )


def _disabledShown(user):
    """
    C{user list}'s DISABLED: C{no}, or since when, and why.
    """
    if user.disabledAt is None:
        return "no"
    reason = f" ({printable(user.disabledReason)})" if user.disabledReason else ""
    return f"since {_time(user.disabledAt)}{reason}"


def _userQuotaOptions(args):
    """
    C{user quota}'s limits, read before the database is opened:
    C{args.changes} are the C{setQuota} changes (no C{messages} without
    C{--messages}; L{DEFAULT} is C{None}).
    """
    changes = {"octets": _limit(args.size, parseSize, "size")}
    if args.messages is not None:
        changes["messages"] = _limit(args.messages, _messageCount, "message count")
    for what, value in (("size", changes["octets"]), ("message count", changes.get("messages"))):
        if value == 0:
            # As for --default-quota: not "no limit" (Dovecot's 0) but a
            # mailbox that refuses all mail.
            raise CommandError(f"bad {what}: {ZERO_QUOTA}", EX_USAGE)
    args.changes = changes


def _userQuota(store, args, out, stdin):
    address, changes = args.address, args.changes
    octets = changes["octets"]
    _forUser(address, store.setQuota(address, **changes))
    status = _result(store.quotaOf(address))
    limits = describeLimit(octets, "octets")
    if "messages" in changes:
        limits += f", messages: {describeLimit(changes['messages'])}"
    out.write(
        f"quota of {address}: {limits}; in use: {counted(status.usedMessages, 'message')}, "
        f"{counted(status.usedOctets, 'octet')}\n"
    )
    audit.outcome(args, f"quota set to {limits}")
    _warnIfFull(args, address, status)


def _userExpireOptions(args):
    args.days = _limit(args.days, _dayCount, "number of days")
    if args.days == 0:
        # As for --expire-days: not "no limit" but all of the user's mail.
        raise CommandError(f"bad number of days: {ZERO_DAYS}", EX_USAGE)


def _userExpire(store, args, out, stdin):
    address, days = args.address, args.days
    _forUser(address, store.setExpire(address, days))
    expiry = f"{describeLimit(days, 'days')}{' ' + noun(days, 'day') if days not in (DEFAULT, UNLIMITED) else ''}"
    out.write(f"messages of {address} expire after: {expiry}\n")
    audit.outcome(args, f"messages expire after: {expiry}")


def _userTestOptions(args):
    """
    C{user test}'s options, read before the database is opened: the
    address, C{--from} as the Twisted address a server's connection from
    there has (C{args.peer}, C{None} without it), the password's source.
    """
    _readAddresses("address")(args)
    args.peer = None if args.client is None else _clientAddress(args.client)
    _passwordOptions(args)


def _userTest(store, args, out, stdin):
    """
    Check a password as a login would (Dovecot's C{doveadm auth test}),
    without logging in: nothing is changed, not even an imported hash.
    With the right password, what else refuses the user's logins is said
    too, as doveadm prints the passdb's C{nologin}, C{reason} and
    C{allow_nets}: that they are disabled, the networks they may log in
    from (and whether a client at C{--from} is on them).  A wrong password
    is told as before, whatever the user's state.
    """
    address = args.address
    user = _existingUser(store, address)
    password = _readPassword(args, stdin, confirm=False)
    if not verifyPassword(password.encode("utf-8"), user.passwordHash):
        raise CommandError(f"that is not the password of {address}", EX_NOPERM)
    _passwordKept(out, address, user, password)
    summary = _result(store.userSummary(address))
    if summary is None:
        # Deleted (or renamed) since it was looked up.
        raise CommandError(f"no such user: {address}", EX_NOUSER)
    refusals = []
    if summary.disabledAt is not None:
        reason = f" ({printable(summary.disabledReason)})" if summary.disabledReason else " (no reason given)"
        out.write(
            f"{address} is disabled since {_time(summary.disabledAt)}{reason}: every POP3 login of theirs is "
            f"refused (mailgate user enable {address} lets them in again)\n"
        )
        refusals.append("disabled")
    refused = _networksSaid(out, args, address, summary.allowedNetworks, "mailgate user networks")
    if refused is not None:
        refusals.append(refused)
    if refusals:
        raise CommandError(
            f"the password is right, but a login of {address} is refused: {' and '.join(refusals)}", EX_NOPERM
        )


def _passwordKept(out, address, user, password):
    """
    C{user test}'s line for the right password: which hash it was checked
    against, and whether CRAM-MD5 takes it too.
    """
    kept = _hashKept(user.passwordHash)
    if user.cramMD5 is not None:
        # What AUTH CRAM-MD5 is checked against, kept apart from the hash:
        # whether the password works there too.
        matches = hmacMD5Context(password.encode("utf-8")).hex() == user.cramMD5
        kept += (
            "; CRAM-MD5 works with it too" if matches
            else "; but not for CRAM-MD5, whose states were made from another password (user passwd makes new ones)"
        )
    out.write(f"the password of {address} is correct (kept as {kept})\n")


def _userRecountOptions(args):
    if args.all and args.addresses:
        raise CommandError("give the ADDRESSes to recount or --all, not both", EX_USAGE)
    if not args.all and not args.addresses:
        raise CommandError("give the ADDRESSes to recount, or --all", EX_USAGE)
    args.addresses = [_address(text) for text in args.addresses]


def _userRecount(store, args, out, stdin):
    if args.all:
        addresses = [user.address for user in _result(store.listUsers())]
    else:
        addresses = args.addresses
    wrong = gone = done = 0
    for address in addresses:
        try:
            before, after = _forUser(address, store.recountUsage(address))
        except CommandError as e:
            if not args.all or e.code != EX_NOUSER:
                raise
            # Deleted (or renamed) since the list was read: nothing of
            # theirs to count, and no reason to leave the others uncounted.
            gone += 1
            out.write(f"{address}: no longer a user (deleted or renamed meanwhile), not recounted\n")
            continue
        recount = f"{address}: {counted(after[0], 'message')}, {counted(after[1], 'octet')}"
        if before == after:
            out.write(f"{recount}, as kept\n")
        else:
            wrong += 1
            out.write(f"{recount} (was kept as {counted(before[0], 'message')}, {counted(before[1], 'octet')})\n")
        done += 1
        audit.outcome(args, f"recounted {counted(done, 'user')}; the use kept for {wrong} was wrong")
    if args.all:
        out.write(f"recounted {counted(len(addresses) - gone, 'user')}; the use kept for {wrong} was wrong\n")


def _userApop(store, args, out, stdin):
    address = args.address
    user = _existingUser(store, address)
    if args.state == "off":
        # CRAM-MD5's states from Dovecot go too: what is left proves
        # nothing without the password.
        credentials = StoredCredentials(user.passwordHash, user.scramSha256, None, None)
        _setCredentialsOf(store, user, credentials)
        out.write(f"APOP and CRAM-MD5 disabled for {address}; its stored secret and CRAM-MD5 states are erased\n")
        audit.outcome(args, "APOP and CRAM-MD5 disabled")
        return
    # The database holds only a hash, so APOP needs the password once more:
    # it must be the user's current password.
    password = _readPassword(args, stdin, confirm=False)
    if not verifyPassword(password.encode("utf-8"), user.passwordHash):
        raise CommandError(f"that is not the current password of {address}", EX_DATAERR)
    # CRAM-MD5's states from Dovecot stay: they are what has it offered
    # (by default), and erased, the user's CRAM-MD5 client would fail
    # wherever no other user has them.
    credentials = StoredCredentials(user.passwordHash, user.scramSha256, password, user.cramMD5)
    _setCredentialsOf(store, user, credentials)
    out.write(f"APOP enabled for {address}\n")
    audit.outcome(args, "APOP enabled")


def _userRename(store, args, out, stdin):
    old, new = _storedAsTyped(store, args, "old"), args.new
    if old == new:
        _existingUser(store, old)
        raise CommandError(f"OLD and NEW are the same address, {old}: nothing to rename", EX_USAGE)
    try:
        _forUser(old, store.renameUser(old, new))
    except UserExists:
        raise CommandError(f"user {new} already exists", EX_CANTCREAT)
    except AliasExists as e:
        raise CommandError(_aliasTaken(e), EX_CANTCREAT)
    except MaildropInUse:
        raise _inSession(old)
    out.write(f"renamed {old} to {new}; the maildrop, its unique ids and quota follow\n")
    out.write(_domainNote(args, new))
    audit.outcome(args, f"renamed to {new}")


def _disabledReason(text):
    """
    A C{--reason} as kept and told to the user's client: its white space
    (line breaks too) one space each, at most L{UserDisabled.REASON_MAX}
    characters, printable; C{None} for none.
    """
    if text is None:
        return None
    reason = " ".join(text.split())
    if not reason:
        raise CommandError("--reason is empty: give a reason, or leave --reason out", EX_USAGE)
    if not reason.isprintable():
        raise CommandError("--reason holds characters that cannot be shown (not UTF-8, or controls)", EX_USAGE)
    if len(reason) > UserDisabled.REASON_MAX:
        raise CommandError(f"--reason is longer than {UserDisabled.REASON_MAX} characters", EX_USAGE)
    return reason


def _userDisableOptions(args):
    args.reason = _disabledReason(args.reason)
    args.wait = _number(args.wait, _seconds, "--wait")


def _userDisable(store, args, out, stdin):
    """
    Disable a user (Dovecot's C{nologin}): their logins refused on every
    node from the next one, and their POP3 session in progress ended, as
    C{mailgate kick} ends it (its deletions not applied).
    """
    address = _storedAsTyped(store, args, "address")
    reason = args.reason
    already = _forUser(address, store.disableUser(address, reason))
    said = f" ({reason})" if reason else ""
    if already:
        out.write(f"{address} was disabled already; the reason is now{said or ' none'}\n")
    else:
        out.write(f"disabled {address}{said}: POP3 logins refused on every server; mail is still delivered\n")
    audit.outcome(args, f"disabled{said}")
    # Without a live node (no server running on the database), no
    # session can appear in the registry: no need to look again.
    lookAgain = None if _result(store.listNodes()) else 0
    marked = []
    try:
        ended = endSessions(store, address, args.wait, lookAgain, marked=marked)
    except CommandError as e:
        audit.outcome(args, f"disabled{said}; its POP3 session{masterNote(marked)} has not ended yet")
        raise CommandError(f"{address} is disabled; {e}", e.code) from None
    if ended:
        by = masterNote(marked)
        out.write(f"its POP3 session{by} has ended; nothing it marked deleted was removed\n")
        audit.outcome(args, f"disabled{said}; its POP3 session{by} has ended")


def _userNetworksOptions(args):
    """
    C{user networks}' NETWORKS, read before the database is opened: their
    canonical text (L{parseAllowedNetworks}), C{None} for C{any}.
    """
    args.networks = _networksArgument(args.networks)


def _userNetworks(store, args, out, stdin):
    """
    Restrict where a user may log in from (Dovecot's C{allow_nets}), or
    with C{any} lift the restriction: on every node from the next login.
    """
    address = _storedAsTyped(store, args, "address")
    networks = args.networks
    previous = _forUser(address, store.setAllowedNetworks(address, networks))
    _networksChanged(
        out, args, address, previous, networks,
        "POP3 logins from elsewhere are refused on every server as a wrong password is",
    )


def _userEnable(store, args, out, stdin):
    address = _storedAsTyped(store, args, "address")
    if _forUser(address, store.enableUser(address)):
        out.write(f"enabled {address}: POP3 logins with their password work again\n")
        audit.outcome(args, "enabled")
    else:
        out.write(f"{address} was not disabled; nothing changed\n")
        audit.outcome(args, "not disabled; nothing changed")


def _addUserCommands(commands):
    """
    C{mailgate user ...}: users, their passwords, quotas and retention.
    """
    user = commands.add_parser("user", help="manage users").add_subparsers(
        dest="action", metavar="ACTION"
    )
    user.required = True
    add = user.add_parser(
        "add",
        help="add a user",
        description="Add a user (an empty maildrop, the server's default quota and retention) with a "
        "password asked for on the terminal, or read with --password-stdin: its first line, UTF-8, "
        "at most 1024 octets.  A user that exists already is left as it is (exit 73).",
    )
    add.add_argument("address", metavar="ADDRESS")
    _addPasswordStdin(add)
    add.add_argument(
        "--apop",
        action="store_true",
        help="also allow APOP; this keeps the password recoverable in the database (see README)",
    )
    _addHashed(add)
    add.set_defaults(
        run=_userAdd,
        migrate=True,
        create=True,
        readOptions=_readAddresses("address", then=_userAddOptions),
        audit=audit.account("user add"),
    )
    passwd = user.add_parser(
        "passwd",
        help="change a user's password",
        description="Change a user's password (asked for on the terminal, or read with "
        "--password-stdin: its first line, UTF-8, at most 1024 octets), for every login method "
        "the user has (APOP and CRAM-MD5 too).  The old password fails at once on every server.",
    )
    passwd.add_argument("address", metavar="ADDRESS")
    _addPasswordStdin(passwd)
    _addHashed(passwd)
    passwd.set_defaults(
        run=_userPasswd, migrate=True, readOptions=_readAddresses("address", then=_passwordOptions),
        audit=audit.account("user passwd"),
    )
    imports = user.add_parser(
        "import",
        help="add the users of a Dovecot passwd-file, keeping their passwords",
        description="Add the users of a Dovecot passwd-file (user:{SCHEME}hash:...; '-' reads "
        "standard input), keeping their password hashes: each is replaced by mailgate's own "
        "at the user's first login.  Users already there are left as they are, so the "
        "command can be run again.  SCRAM-SHA-256 works for a user once they have logged "
        "in with their password (at once for Dovecot's {SCRAM-SHA-256} and {PLAIN}).  An "
        "account with nologin (its reason= the reason) or fail, whose logins Dovecot refused, "
        "is added disabled, as by user disable: user enable lets it in with its password.  An "
        "account with allow_nets may log in from those networks only, as by user networks "
        "(allow_real_nets, the address of a proxy that forwarded the client, is not kept: said "
        "on standard error).",
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
        help="replace the password of users already there whose password is still the hash "
        "imported (they have not logged in to mailgate since) with the file's, for passwords "
        "changed on the old server while the move goes on (not a password in clear, {PLAIN}, "
        "hashed as imported: those users are named); and disable users already there whom "
        "the file now disables (nologin, fail), as user disable does",
    )
    imports.add_argument(
        "--apop",
        action="store_true",
        help="also allow APOP (and CRAM-MD5) for the users whose password is in clear ({PLAIN}), "
        "as Dovecot did; this keeps it recoverable in the database (see README)",
    )
    imports.set_defaults(
        run=_userImport, migrate=True, create=True, readOptions=_userImportOptions,
        audit=audit.account("user import", "file"),
    )
    delete = user.add_parser(
        "del",
        help="delete a user and their maildrop",
        description="Delete a user and their maildrop.  Refused while the user is in a POP3 session.",
    )
    delete.add_argument("address", metavar="ADDRESS")
    delete.set_defaults(
        run=_userDel, migrate=True, readOptions=_keepTyped("address"), audit=audit.account("user del")
    )
    listing = user.add_parser(
        "list",
        help="list users: their use, their own limits, their last POP3 login",
        description="List every user, by address in byte order: messages and octets in use, "
        "APOP (on, off, or cram for CRAM-MD5 alone), their own quota, message limit and "
        "retention (default: the server's), their last POP3 login (never for none yet), and "
        "the networks they may log in from (user networks; any for anywhere), and whether they "
        "are disabled (user disable: since when, and why).",
    )
    _addJSON(listing)
    listing.set_defaults(run=_userList, migrate=True, readsOnly=True)
    test = user.add_parser(
        "test",
        help="check a user's password without logging in",
        description="Check a user's password as a POP3 login would (as doveadm auth test): exit "
        "0 if it is right, 77 if not.  With the right password it also says what else refuses the user's "
        "logins: that the user is disabled (since when, and why), and the networks they may log in from; "
        "exit 77 too if the user is disabled, or if --from names a client on none of those networks.  "
        "Nothing is changed, not even an imported hash.",
    )
    test.add_argument("address", metavar="ADDRESS")
    test.add_argument(
        "--from",
        dest="client",
        metavar="ADDRESS",
        help="the client's IP address (or local, for a Unix socket's), as the server sees it: whether the "
        "user's networks let a login from there in",
    )
    _addPasswordStdin(test)
    test.set_defaults(run=_userTest, migrate=True, readOptions=_userTestOptions, readsOnly=True)
    apop = user.add_parser(
        "apop",
        help="switch APOP (and CRAM-MD5) on or off for a user; off also erases CRAM-MD5 states from Dovecot",
        description="on keeps the password recoverably, for APOP and CRAM-MD5 (it asks for the password); "
        "off erases it, and the CRAM-MD5 states of a {CRAM-MD5} hash imported from Dovecot: the user "
        "then has neither APOP nor CRAM-MD5.",
    )
    apop.add_argument("address", metavar="ADDRESS")
    apop.add_argument("state", choices=["on", "off"])
    _addPasswordStdin(apop)
    apop.set_defaults(
        run=_userApop, migrate=True, readOptions=_readAddresses("address", then=_passwordOptions),
        audit=audit.account("user apop", lambda args: f"{args.address} {args.state}"),
    )
    rename = user.add_parser(
        "rename",
        help="give a user a new address (maildrop, unique ids and quota follow)",
        description="Give a user a new address.  The maildrop, its unique ids, quota and "
        "retention follow; the next login must use the new address, on running servers "
        "too.  Refused while the user is in a POP3 session.",
    )
    rename.add_argument("old", metavar="OLD")
    rename.add_argument("new", metavar="NEW")
    rename.set_defaults(
        run=_userRename, migrate=True, readOptions=_keepTyped("old", "new"),
        audit=audit.account("user rename", lambda args: f"{args.old} {args.new}"),
    )
    disable = user.add_parser(
        "disable",
        help="refuse a user's POP3 logins (Dovecot's nologin), keeping the user and their mail",
        description="Refuse every POP3 login of the user (USER/PASS, APOP, SASL, bearer tokens) on "
        "every server sharing the database, from the next one, and end their POP3 session in "
        "progress as mailgate kick does (nothing it marked deleted is removed; waits up to --wait "
        "seconds for it to end: exit 75 if it has not).  A client with the right password is "
        "told -ERR [AUTH] and the reason (Login disabled for this user without one); a wrong "
        "password is refused as any wrong password.  Mail is still delivered, the password and the maildrop "
        "kept: user enable lets the user in again.  Disabled already: the reason is replaced.",
    )
    disable.add_argument("address", metavar="ADDRESS")
    disable.add_argument(
        "--reason", metavar="TEXT",
        help=f"what the user's client is told (printable, at most {UserDisabled.REASON_MAX} characters)",
    )
    disable.add_argument(
        "--wait", default="30", metavar="SECONDS",
        help="how long to wait for the session in progress to end (default 30)",
    )
    disable.set_defaults(
        run=_userDisable, migrate=True, readOptions=_keepTyped("address", then=_userDisableOptions),
        audit=audit.account("user disable"),
    )
    enable = user.add_parser(
        "enable",
        help="let a disabled user log in again",
        description="Let a user disabled by user disable (or imported disabled from a Dovecot "
        "nologin line) log in again, with the password they had.",
    )
    enable.add_argument("address", metavar="ADDRESS")
    enable.set_defaults(
        run=_userEnable, migrate=True, readOptions=_keepTyped("address"), audit=audit.account("user enable")
    )
    networks = user.add_parser(
        "networks",
        help="restrict the networks a user may log in from (Dovecot's allow_nets)",
        description="Let the user log in only from NETWORKS: comma-separated CIDR networks or "
        "addresses (IPv4 and IPv6; an IPv4 client reaching an IPv6 listener is its IPv4 address), "
        "and local for clients with no IP address (a Unix socket); any lifts the restriction.  "
        "The address checked is the client's (the one a trusted balancer's PROXY header names), on "
        "every server sharing the database, from the next login, by every mechanism.  From "
        "elsewhere the right password is refused as a wrong one is (as Dovecot refuses it), and "
        "counts towards the address's penalty and ban the same.  A session in progress goes on; "
        "mail is still delivered.",
    )
    networks.add_argument("address", metavar="ADDRESS")
    networks.add_argument("networks", metavar="NETWORKS", help="e.g. 192.0.2.0/24,2001:db8::/32, or any")
    networks.set_defaults(
        run=_userNetworks, migrate=True, readOptions=_keepTyped("address", then=_userNetworksOptions),
        audit=audit.account("user networks", lambda args: f"{args.address} {args.networks or 'any'}"),
    )
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
    quota.set_defaults(
        run=_userQuota, migrate=True, readOptions=_readAddresses("address", then=_userQuotaOptions),
        audit=audit.Audited("user quota", "address"),
    )
    expire = user.add_parser(
        "expire",
        help="set how many days a user's messages are kept",
        description="Set after how many days a user's messages are removed by the "
        "retention task (advertised to the user's POP3 clients as EXPIRE): a number "
        "of days, 'never', or 'default' for the server's --expire-days.",
    )
    expire.add_argument("address", metavar="ADDRESS")
    expire.add_argument("days", metavar="N|never|default")
    expire.set_defaults(
        run=_userExpire, migrate=True, readOptions=_readAddresses("address", then=_userExpireOptions),
        audit=audit.Audited("user expire", "address"),
    )

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
    recount.set_defaults(
        run=_userRecount, migrate=True, readOptions=_userRecountOptions,
        audit=audit.Audited("user recount", lambda args: "--all" if args.all else " ".join(args.addresses)),
    )
