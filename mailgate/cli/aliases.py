# -*- test-case-name: tests.test_aliases_cli -*-
"""
C{mailgate alias ...}: other addresses of a user, for mail received
directly (see L{mailgate.store.aliases}).
"""

from mailgate.address import CATCH_ALL
from mailgate.cli import audit
from mailgate.cli.common import (
    CommandError,
    EX_CANTCREAT,
    EX_DATAERR,
    EX_NOINPUT,
    EX_NOUSER,
    _address,
    _domainNote,
    _forUser,
    _jsonLines,
    _readAddresses,
    _result,
    _shown,
)
from mailgate.errors import AliasExists, NoSuchAlias, UserExists
from mailgate.importers.virtualaliases import MAX_FILE, DomainLine, VirtualAlias, readVirtualFile
from mailgate.plural import counted
from mailgate.store.sql import IMPORT_BATCH


def _aliasAddress(text):
    """
    An alias as the command line gives it, normalised as a user's address
    is; C{@example.org}, the domain's catch-all, as its domain is.
    """
    if text.strip().startswith(CATCH_ALL):
        # The domain as an address of it has it (IDNA, lower case).
        return CATCH_ALL + _address(f"postmaster{text.strip()}").rpartition("@")[2]
    return _address(text)


def _readAlias(then=None):
    """
    C{readOptions} reading the ALIAS argument (L{_aliasAddress}), then the
    others C{then} reads.
    """

    def readOptions(args):
        args.alias = _aliasAddress(args.alias)
        if then is not None:
            then(args)

    return readOptions


def _aliasAdd(store, args, out, stdin):
    alias, address = args.alias, args.address
    if alias == address:
        raise CommandError(f"{alias} is the user's own address: an alias is another one", EX_CANTCREAT)
    try:
        added = _forUser(address, store.addAlias(alias, address))
    except (UserExists, AliasExists) as e:
        raise CommandError(_refusedAlias(alias, address, e), EX_CANTCREAT)
    if added and alias.startswith(CATCH_ALL):
        out.write(
            f"added {alias}, the catch-all of {alias[1:]}: mail to an address there that no user or alias "
            f"has is {address}'s\n"
        )
        audit.outcome(args, f"added, the catch-all, of {address}")
    elif added:
        out.write(f"added {alias}, an alias of {address}: mail to it is {address}'s\n")
        audit.outcome(args, f"added, an alias of {address}")
    else:
        out.write(f"{alias} is an alias of {address} already\n")
    out.write(_domainNote(args, alias))


def _aliasDel(store, args, out, stdin):
    alias = args.alias
    try:
        target = _result(store.removeAlias(alias))
    except NoSuchAlias:
        raise CommandError(f"no such alias: {alias}", EX_NOUSER) from None
    of = f" (of {target})" if target is not None else " (of a user no longer there)"
    out.write(f"removed the alias {alias}{of}: mail to it is refused from now on\n")
    audit.outcome(args, f"removed{of}")


def _aliasList(store, args, out, stdin):
    aliases = _forUser(args.address, store.listAliases(args.address))
    if args.virtual:
        return _virtualListing(store, args, aliases, out)
    if args.json:
        return _jsonLines(out, ({"alias": a.alias, "user": a.address} for a in aliases))
    width = max([len("ALIAS"), *(len(a.alias) for a in aliases)])
    out.write(f"{'ALIAS':<{width}}  USER\n")
    for a in aliases:
        # An alias whose user was removed by hand (not with user del):
        # no mail reaches it (db check names it).
        out.write(f"{a.alias:<{width}}  {a.address if a.address is not None else '- (no such user)'}\n")


def _virtualListing(store, args, aliases, out):
    """
    C{alias list --virtual}: the aliases as lines of Postfix's virtual(5)
    source file, for a site moving its mail to a Postfix in front (or
    away: the other half of C{mailgate mailbox export}), which
    C{mailgate alias import} reads back.  A catch-all there takes mail to
    the domain's every address, its users' own too, unless each is mapped
    to itself (virtual(5): virtual_alias_maps is asked before any
    mailbox); here no catch-all takes a user's mail, so each user of a
    domain with a catch-all gets that line, as virtual(5) shows.
    """
    from mailgate.store.paging import LISTING_PAGE

    gone = [a.alias for a in aliases if a.address is None]
    kept = [a for a in aliases if a.address is not None]
    catchAlls = {a.alias[len(CATCH_ALL):] for a in _result(store.listAliases()) if a.alias.startswith(CATCH_ALL)}
    out.write("# mailgate's aliases, as Postfix's virtual(5) reads them (postmap it for virtual_alias_maps)\n")
    for a in kept:
        out.write(f"{a.alias} {a.address}\n")
    if catchAlls:
        if args.address is None:
            guarded = (u.address for u in _result(store.listUsers(page=LISTING_PAGE)))
        else:
            guarded = [args.address]
        said = False
        for user in guarded:
            if user.rpartition("@")[2] in catchAlls:
                if not said:
                    out.write("# each user of a domain with a catch-all, to itself: else the catch-all takes its mail\n")
                    said = True
                out.write(f"{user} {user}\n")
    if gone:
        # Not written: there is no user for Postfix to give their mail to.
        args.stderr.write(
            f"mailgate: left out, their user no longer there (mailgate db check): {', '.join(gone)}\n"
        )


def _aliasImportOptions(args):
    """
    C{alias import}'s file, read before the database is opened (standard
    input, C{-}, once it is): one that cannot be read is said as such
    whatever the database's state.
    """
    if args.file == "-" and args.stdin is None:
        raise CommandError("cannot read -: standard input is closed", EX_NOINPUT)
    args.lines = None
    if args.file != "-":
        try:
            with open(args.file, "rb") as f:
                args.lines = _virtualLines(f.read(MAX_FILE + 1), args.file)
        except OSError as e:
            raise CommandError(f"cannot read {_shown(args.file)}: {e.strerror}", EX_NOINPUT) from None


def _virtualLines(data, path):
    """
    The lines of a virtual(5) file's octets, read no further than
    L{MAX_FILE}: octets that are not UTF-8 kept as lone surrogates (an
    address holding some is refused as the line's own fault), a byte
    order mark first no part of the first pattern.
    """
    if len(data) > MAX_FILE:
        raise CommandError(
            f"{_shown(path)} is larger than {counted(MAX_FILE, 'octet')}: no virtual(5) file is (the wrong file?)",
            EX_DATAERR,
        )
    return data.decode("utf-8-sig", "surrogateescape").splitlines()


def _refusedAlias(alias, target, e):
    """
    Why the store refused to make C{alias} an alias of C{target}, in the
    words of C{alias add}.
    """
    if isinstance(e, UserExists):
        return f"{alias} is a user's address: an address is a user's or an alias"
    if isinstance(e, AliasExists):
        return f"{alias} is an alias of {e.target}: remove it first (mailgate alias del {alias})"
    return f"{alias}: no such user: {target}"


def _aliasImport(store, args, out, stdin):
    """
    Add the aliases of a Postfix virtual(5) file, each that names one
    mailgate user: an alias there already is left as it is, so a run can
    be repeated.  A line mailgate cannot keep (a list, a copy kept and
    one sent on, an address elsewhere, a user not imported) is said with
    its number and why; the others are imported.
    """
    shownFile = _shown(args.file)
    dryRun = args.dry_run
    if args.file == "-":
        binary = getattr(stdin, "buffer", None)
        try:
            # Its octets, as a file's are read, and no further than a
            # file's bound.
            if binary is None:
                data = stdin.read(MAX_FILE + 1).encode("utf-8", "surrogateescape")
            else:
                data = binary.read(MAX_FILE + 1)
        except OSError as e:
            raise CommandError(f"cannot read -: {e.strerror or e}", EX_NOINPUT) from None
        lines = _virtualLines(data, "-")
    else:
        # Read before the database was opened (_aliasImportOptions).
        lines = args.lines
    entries = list(readVirtualFile(lines))
    patterns = {e.pattern: e for e in entries if isinstance(e, VirtualAlias)}
    # Which addresses the lines name are users', IMPORT_BATCH at a time in
    # one statement each; the aliases there already, in one.
    named = sorted({a for e in patterns.values() for a in (e.pattern, *e.targets) if not a.startswith(CATCH_ALL)})
    users = set()
    for at in range(0, len(named), IMPORT_BATCH):
        users.update(_result(store.findUsers(named[at : at + IMPORT_BATCH])))
    aliases = {a.alias: a.address for a in _result(store.listAliases())}
    # The users of aliases there are users too (an alias of a user
    # removed by hand has none).
    users.update(address for address in aliases.values() if address is not None)
    fileDomains = {e.pattern.rpartition("@")[2] for e in patterns.values()}
    added = present = skipped = failed = 0
    # Aliases to add wait here, to be added IMPORT_BATCH at a time in one
    # transaction (store.addAliases); each line's outcome is printed in
    # the file's order: those waiting are added before any other line is
    # printed.
    pending = []
    addedDomains = set()

    def refused(number, reason):
        nonlocal failed
        failed += 1
        args.stderr.write(f"mailgate: {shownFile} line {number}: {_shown(reason)}\n")

    def addPending():
        nonlocal added, present
        if not pending:
            return
        batch = pending[:]
        del pending[:]
        if dryRun:
            outcomes = [_expectedOutcome(alias, target, users, aliases) for _, alias, target, _ in batch]
        else:
            outcomes = _result(store.addAliases([(alias, target) for _, alias, target, _ in batch]))
        for (number, alias, target, via), outcome in zip(batch, outcomes):
            what = f"{alias}, {'a catch-all alias' if alias.startswith(CATCH_ALL) else 'an alias'} of {target}"
            if isinstance(outcome, Exception):
                refused(number, _refusedAlias(alias, target, outcome))
            elif outcome:
                added += 1
                addedDomains.add(alias.rpartition("@")[2])
                through = f" (through {', '.join(via)})" if via else ""
                out.write(f"{'would add' if dryRun else 'added'} {what}{through}\n")
            else:
                present += 1
                out.write(f"exists {what}\n")

    def skip(text):
        nonlocal skipped
        addPending()
        skipped += 1
        out.write(f"skipped {text}\n")

    try:
        for entry in entries:
            if isinstance(entry, DomainLine):
                skip(
                    f"{entry.domain}: a virtual alias domain's line (virtual_alias_domains), no address: mailgate "
                    "takes mail for the domains of its users and aliases"
                )
                continue
            if not isinstance(entry, VirtualAlias):
                addPending()
                refused(entry.number, entry.reason)
                continue
            judged = _judged(entry, users, aliases, patterns)
            if isinstance(judged, _Skip):
                skip(judged.text)
            elif isinstance(judged, _Refusal):
                reason = judged.reason
                if judged.nobody is not None:
                    reason = _nobodyReason(store, entry.pattern, judged.nobody, judged.via, fileDomains)
                addPending()
                refused(entry.number, reason)
            else:
                pending.append((entry.number, entry.pattern, judged.target, judged.via))
                if len(pending) >= IMPORT_BATCH:
                    addPending()
        addPending()
    except BaseException:
        # Stopped (Ctrl-C, the database lost): the aliases said to be
        # added are; those after them are not.
        if added and not dryRun:
            audit.outcome(args, f"stopped after adding {counted(added, 'alias', 'aliases')}")
            args.stderr.write(
                f"mailgate: stopped after adding {counted(added, 'alias', 'aliases')} of {shownFile} (said above): "
                "run the command again to import the rest (aliases there are left as they are)\n"
            )
        raise
    summary = f"{added} {'to add' if dryRun else 'added'}, {present} already there, {skipped} skipped, {failed} failed"
    out.write(f"{summary}{' (a dry run: nothing was changed)' if dryRun else ''}\n")
    for domain in sorted(addedDomains):
        out.write(_domainNote(args, f"@{domain}", "its aliases"))
    audit.outcome(args, summary)
    if failed:
        raise CommandError(f"{counted(failed, 'line')} of {shownFile} not imported", EX_DATAERR)


class _Skip:
    def __init__(self, text):
        self.text = text


class _Refusal:
    def __init__(self, reason, nobody=None, via=()):
        self.reason = reason
        #: the one address the pattern is rewritten to, which is no user's
        self.nobody = nobody
        self.via = via


class _Alias:
    def __init__(self, target, via):
        self.target = target
        self.via = via


def _judged(entry, users, aliases, patterns):
    """
    What to make of a line of the file: a L{_Skip}, a L{_Refusal}, or the
    L{_Alias} to add.

    @param users: the addresses the file names that are users', and the
        users of the aliases there.
    @param aliases: the aliases there already, each to its user's address.
    @param patterns: the file's L{VirtualAlias} lines, by pattern.
    """
    alias = entry.pattern
    others = [t for t in entry.targets if t != alias]
    copy = len(others) < len(entry.targets)
    if alias in users:
        if not others:
            # Postfix's a@x a@x, which keeps a mailbox's mail from a
            # catch-all of its domain: a user's mail is theirs here.
            return _Skip(f"{alias}: it maps to itself, a user's address, whose mail is its own (no catch-all takes it)")
        if copy:
            return _Refusal(
                f"{alias} is a user's address and keeps its mail; the copy Postfix sent on to {', '.join(others)} "
                "is not made: mailgate keeps one copy of a message (forward it in the MTA in front)"
            )
        return _Refusal(f"{alias} is a user's address: an address is a user's or an alias")
    if not others:
        return _Refusal(f"{alias} maps only to itself, and is no mailgate user: add it first (mailgate user import)")
    if copy:
        return _Refusal(
            f"{alias} keeps a copy and sends one on to {', '.join(others)}: mailgate keeps one copy of a message, "
            f"and {alias} is no mailgate user: add it (mailgate user import), or make it an alias of "
            f"{others[0]} alone (mailgate alias add {alias} {others[0]})"
        )
    if len(others) > 1:
        return _Refusal(
            f"{alias} is a list of {len(others)} addresses ({', '.join(others)}): an alias names one user, a list "
            "is the MTA's to expand"
        )
    # A target the file rewrites on to one address (Postfix rewrites the
    # result again, as mail to it is): the alias is the last one's.
    target, via = others[0], []
    while target not in users and target not in via and target != alias:
        onward = patterns.get(target)
        if onward is None or len(onward.targets) != 1 or onward.targets[0] == target:
            break
        via.append(target)
        target = onward.targets[0]
    if target not in users and aliases.get(target) is not None:
        # An alias there already: its user's.
        via.append(target)
        target = aliases[target]
    if target not in users:
        return _Refusal(None, nobody=target, via=tuple(via))
    return _Alias(target, tuple(via))


def _nobodyReason(store, alias, target, via, fileDomains):
    """
    Why C{alias} is not made an alias of C{target}, no user's address:
    one of a domain the site has (a user not imported yet) or of another
    (forwarding, which mailgate never does).
    """
    through = f" (through {', '.join(via)})" if via else ""
    domain = target.rpartition("@")[2]
    if domain in fileDomains or _result(store.hasDomain(domain)):
        return f"{alias}: {target}{through} is no mailgate user (not imported yet? mailgate user import)"
    return (
        f"{alias}: {target}{through} is an address elsewhere (no user or alias here is of {domain}): mail to "
        f"{alias} was forwarded to it, which mailgate does not do"
    )


def _expectedOutcome(alias, target, users, aliases):
    """
    What L{mailgate.store.aliases._addAlias} would answer (C{--dry-run}),
    from the users and aliases read before.
    """
    if alias in users:
        return UserExists(alias)
    owner = aliases.get(alias)
    if owner is None:
        # None there, or the alias of a user removed by hand: given anew.
        return True
    return False if owner == target else AliasExists(alias, owner)


def _addAliasCommands(commands):
    """
    C{mailgate alias add|del|list}: every node takes a change at the next
    RCPT.
    """
    alias = commands.add_parser(
        "alias",
        help="other addresses of a user, whose mail is the user's (abuse@, info@)",
        description="Aliases: addresses whose mail is a user's, as Postfix's virtual aliases, for a "
        "mailgate receiving mail directly. SMTP, LMTP and mailgate deliver take mail to an alias as "
        "mail to its user (quota and all), on every server sharing the database from the next "
        "recipient on; POP3 logins take only the user's own address. An alias is one user's: an "
        "address reaching several people is a list, which is the MTA's to expand.",
    ).add_subparsers(dest="action", metavar="ACTION")
    alias.required = True
    aliasAdd = alias.add_parser(
        "add",
        help="make ALIAS an address of the user ADDRESS",
        description="Make ALIAS another address of the user ADDRESS: mail to it (and, with the "
        "server's recipient-delimiter, to a detail of it) is ADDRESS's. Refused (exit 73) where "
        "ALIAS is a user's address or another user's alias; exit 67 if there is no user ADDRESS. "
        "ALIAS @DOMAIN is the domain's catch-all: mail to any address of DOMAIN that no user or alias "
        "has. Its domain is one mail is taken for, unless the server's configuration lists its domains.",
    )
    aliasAdd.add_argument("alias", metavar="ALIAS")
    aliasAdd.add_argument("address", metavar="ADDRESS")
    aliasAdd.set_defaults(
        run=_aliasAdd, migrate=True, readOptions=_readAlias(then=_readAddresses("address")),
        audit=audit.Audited("alias add", "alias"),
    )
    aliasDel = alias.add_parser(
        "del",
        help="remove an alias: mail to it is refused",
        description="Remove the alias ALIAS: from the next recipient on, every server refuses mail "
        "to it (550 5.1.1). The user and their mail stay. Exit 67 if it is no alias.",
    )
    aliasDel.add_argument("alias", metavar="ALIAS")
    aliasDel.set_defaults(
        run=_aliasDel, migrate=True, readOptions=_readAlias(), audit=audit.Audited("alias del", "alias")
    )
    aliasImport = alias.add_parser(
        "import",
        help="add the aliases of a Postfix virtual(5) file (virtual_alias_maps)",
        description="Add the aliases of a Postfix virtual_alias_maps source file (virtual(5): 'pattern "
        "result' lines, read as postmap reads them; '-' reads standard input), each whose result is one "
        "mailgate user: ALIAS USER, @DOMAIN USER (a catch-all), or a result that the file rewrites on to "
        "one user. Aliases already there are left as they are, so the command can be run again. A line "
        "mailgate cannot keep is said on standard error with its number and why, and the others imported "
        "(exit 65 at the end): a list of several addresses, a copy kept and one sent on (a@x a@x, b@x), "
        "an address that is no user's (elsewhere: forwarding, which mailgate does not do; or not "
        "imported yet), a pattern that is a user's address or another user's alias, a pattern without "
        "a domain. A line mapping a user's address to itself, and a domain's line (example.com "
        "anything, for virtual_alias_domains), are skipped.",
    )
    aliasImport.add_argument("file", metavar="VIRTUAL-FILE")
    aliasImport.add_argument(
        "--dry-run", action="store_true", help="say what would be added and what fails, changing nothing"
    )
    aliasImport.set_defaults(
        run=_aliasImport, migrate=True, readOptions=_aliasImportOptions,
        audit=audit.Audited("alias import", "file", when=lambda args: not args.dry_run),
    )
    aliasList = alias.add_parser(
        "list",
        help="list the aliases (of one user, or all) and their users",
        description="List the aliases, of the user ADDRESS or all, in the code point order of the aliases, "
        "each with the user whose mail it is. Exit 67 if there is no user ADDRESS.",
    )
    aliasList.add_argument("address", metavar="ADDRESS", nargs="?")
    shown = aliasList.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="one JSON object per line, for scripts, instead of the table")
    shown.add_argument(
        "--virtual",
        action="store_true",
        help="as lines of Postfix's virtual(5) file (alias import reads them back; with a catch-all, each "
        "user of its domain mapped to itself, as Postfix needs)",
    )
    aliasList.set_defaults(run=_aliasList, migrate=True, readsOnly=True, readOptions=_readAddresses("address"))
