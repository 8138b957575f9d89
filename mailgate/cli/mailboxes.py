# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate mailbox ...}: listing a maildrop, its kept deleted mail,
restoring it, expunging, and exporting it as a Maildir.
"""

import datetime
import os
import re
import time

from mailgate.cli import audit
from mailgate.cli.common import (
    CommandError,
    EX_CANTCREAT,
    EX_DATAERR,
    EX_TEMPFAIL,
    EX_USAGE,
    _addJSON,
    _address,
    _dayCount,
    _existingUser,
    _forUser,
    _inSession,
    _jsonLines,
    _number,
    _readAddresses,
    _result,
    _shown,
    _time,
    _warnIfFull,
)
from mailgate.errors import MaildropInUse
from mailgate.store.bounds import MAX_DAYS
from mailgate.store.limits import DAY
from mailgate.store.paging import LISTING_PAGE
from mailgate.plural import counted, noun
from mailgate.printable import printable


def _mailboxList(store, args, out, stdin):
    address = args.address
    # Read and printed a page at a time: 100,000 messages read whole took
    # 56 MB of the command's memory.
    messages = _forUser(address, store.listMessages(address, page=LISTING_PAGE))
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
        out.write(
            f"\nin use: {counted(status.usedMessages, 'message')}, {counted(status.usedOctets, 'octet')}; "
            f"quota: {_describedQuota(status)}\n"
        )


def _describedQuota(status):
    """
    The limits that apply to a user, for C{mailbox list}: those known
    (the user's own, or the server's default from C{--config}), else
    C{server default} where the user goes by the server's default
    (which this command may not know), else C{none}: the user's own
    quota is none.
    """
    limits = []
    unknownDefault = False
    for limit, own, unit in (
        (status.quotaOctets, status.ownOctets, "octets"),
        (status.quotaMessages, status.ownMessages, "messages"),
    ):
        if limit is not None:
            limits.append(f"{limit} {unit}")
        elif own is None:
            unknownDefault = True
    if limits:
        return ", ".join(limits)
    return "server default" if unknownDefault else "none"


def _mailboxDeleted(store, args, out, stdin):
    address = args.address
    messages = _forUser(address, store.listDeleted(address, page=LISTING_PAGE))
    if args.json:
        return _jsonLines(out, (
            {
                "number": m.number,
                "octets": m.size,
                "unique_id": m.uniqueId,
                "deleted": _time(m.deletedAt),
                "from": m.deletedBy,
                "master": m.deletedByMaster,
            }
            for m in messages
        ))
    out.write(f"{'NUMBER':>6} {'OCTETS':>10}  {'UNIQUE-ID':<20} {'DELETED':<20} FROM\n")
    for message in messages:
        out.write(
            f"{message.number:>6} {message.size:>10}  {message.uniqueId:<20} "
            f"{_time(message.deletedAt):<20} {_deletedFrom(message)}\n"
        )


def _deletedFrom(message):
    """
    Where a kept deleted message was deleted from, as C{mailbox deleted}
    shows it: the client's address (C{import} for an import's run), and
    the master user whose session it was, if one logged in to the
    maildrop (a helpdesk, a backup tool): who deleted the user's mail.
    """
    where = message.deletedBy or "-"
    if message.deletedByMaster is None:
        return where
    return f"{where} (master user {printable(message.deletedByMaster)})"


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


def _storable(text):
    """
    Whether a unique id given on the command line can be one the database
    keeps: octets that are not UTF-8 (read as lone surrogates) never are,
    and the database driver would refuse them with an encoding error.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shownArgument(text):
    """
    An argument as the command line gave it, its octets that are not
    UTF-8 as C{\\xNN}: printable in a one-line error whatever they were.
    """
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _mailboxRestoreOptions(args):
    args.since = None if args.since is None else _parseTime(args.since, time.time())


def _mailboxRestore(store, args, out, stdin):
    address, since = args.address, args.since
    uidls = [uidl for uidl in args.uidls if _storable(uidl)]
    unstorable = [_shownArgument(uidl) for uidl in args.uidls if not _storable(uidl)]
    if args.uidls and not uidls:
        # Only ids no message can have: nothing to restore (and not
        # None, which would restore every kept message).
        _existingUser(store, address)
        restored, missing = [], []
    else:
        done = [0]

        def progress(count):
            done[0] = count

        try:
            restored, missing = _forUser(
                address,
                store.restoreDeleted(address, uidls or None, since=since, asNew=args.as_new, progress=progress),
            )
        except BaseException:
            # All of them come back a few hundred at a time: stopped
            # half-way, those back are back, and said.
            if done[0]:
                audit.outcome(args, f"{counted(done[0], 'message')} restored")
                args.stderr.write(
                    f"mailgate: stopped after restoring {counted(done[0], 'message')} to {address}; the others "
                    "are still kept deleted: run the command again to restore them\n"
                )
            raise
    missing = unstorable + missing
    warned = [new.crossing for _, new in restored if getattr(new, "crossing", None) is not None]
    # Recorded before the listing: they are back whatever becomes of it.
    audit.outcome(
        args,
        f"{counted(len(restored), 'message')} restored{' under new unique ids' if args.as_new else ''}"
        + "".join(f"; warned: {_warning(crossing)}" for crossing in warned),
    )
    try:
        for old, new in restored:
            out.write(f"restored {old}" + (f" as {new}\n" if new != old else "\n"))
    except KeyboardInterrupt:
        # Ctrl-C while thousands of lines went to a slow terminal: every
        # one of them was restored already, which the listing cut short
        # never said (and "run the command again" restores nothing).
        args.stderr.write(
            f"mailgate: interrupted while listing them: {counted(len(restored), 'message')} restored to "
            f"{address}\n"
        )
        raise
    out.write(f"{counted(len(restored), 'message')} restored to {address}\n")
    for crossing in warned:
        out.write(f"warned {address}: {_warning(crossing)}; a message saying so follows the restored ones\n")
    if restored:
        _warnIfFull(args, address, _result(store.quotaOf(address)))
    if missing:
        raise CommandError(
            f"not among {address}'s kept deleted messages: {' '.join(missing)}", EX_DATAERR
        )


def _warning(crossing):
    """
    The quota warning a restore put into the maildrop, for its output:
    C{its mailbox is 80% full (8200 octets of its 10240)}, as a delivery
    that brought the use there would have (the README's Quotas).
    """
    unit = "octet" if crossing.resource == "octets" else "message"
    # As the message's subject says it (mailgate.store.limits.quotaWarningMessage).
    state = "full" if crossing.used * 100 // crossing.limit >= 100 else f"{crossing.percent}% full"
    return f"its mailbox is {state} ({counted(crossing.used, unit)} of its {crossing.limit})"


def _mailboxExpungeOptions(args):
    args.address = _address(args.address)
    args.older_than = None if args.all else _number(args.older_than, _dayCount, "--older-than")


def _mailboxExpunge(store, args, out, stdin):
    address = args.address
    days = args.older_than
    what = "every message" if args.all else f"messages older than {counted(days, 'day')}"
    done = [(0, 0)]

    def progress(removed, kept):
        done[0] = (removed, kept)

    try:
        removed, kept = _forUser(address, store.expungeMessages(address, days, progress=progress))
    except BaseException as e:
        # Committed a few hundred at a time: stopped half-way (Ctrl-C,
        # the database lost), what is gone is gone, and said.
        removed, kept = done[0]
        if removed or kept:
            audit.outcome(
                args, f"removed {counted(removed, 'message')} and {kept} kept deleted {noun(kept, 'message')}"
            )
            args.stderr.write(
                f"mailgate: stopped after removing {counted(removed, 'message')} and {kept} kept deleted "
                f"{noun(kept, 'message')} ({what}) from {address}; the rest is still there: run the command "
                "again to remove it\n"
            )
        if isinstance(e, MaildropInUse):
            raise _inSession(address) from None
        raise
    out.write(f"removed {counted(removed, 'message')} ({what}) from {address}\n")
    audit.outcome(
        args, f"removed {counted(removed, 'message')} ({what}) and {kept} kept deleted {noun(kept, 'message')}"
    )
    if kept:
        out.write(f"removed {kept} deleted {noun(kept, 'message')} kept for recovery ({what}) too\n")


def _mailboxExportOptions(args):
    if args.all:
        if len(args.operands) != 1:
            raise CommandError("with --all, give the directory alone (each user goes into DIR/ADDRESS)", EX_USAGE)
    elif len(args.operands) != 2:
        raise CommandError("give ADDRESS and DIR (or --all DIR)", EX_USAGE)
    else:
        address, directory = args.operands
        args.operands = [_address(address), directory]


def _mailboxExport(store, args, out, stdin):
    from mailgate.importers import ImportFailed
    from mailgate.importers.export import exportMaildir

    if args.all:
        [root] = args.operands
        targets = [(user.address, os.path.join(root, user.address)) for user in _result(store.listUsers())]
        # Made here, for its owner only as each user's own: made on the
        # way to the first user's, it would list every address to every
        # account of the machine.
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
        except OSError:
            pass  # each user's export says why it cannot be made
    else:
        address, directory = args.operands
        targets = [(address, directory)]
    failedMessages = failedUsers = 0
    for address, directory in targets:
        if args.all and (os.sep in address or address.startswith(".")):
            # A local part may hold a slash: never a path out of DIR.
            args.stderr.write(f"mailgate: {_shown(address)}: not exported: its address cannot be a directory name\n")
            failedUsers += 1
            continue
        messages = _forUser(address, store.exportMessages(address))
        try:
            # Each line one line, whatever DIR as given holds (as failed()
            # writes the command's own; a line break split these in two).
            report = exportMaildir(
                messages, directory,
                progress=lambda line: args.stderr.write(f"mailgate: {_shown(f'{address}: {line}')}\n"),
            )
        except ImportFailed as e:
            if not args.all:
                raise CommandError(str(e), EX_CANTCREAT)
            args.stderr.write(f"mailgate: {_shown(f'{address}: not exported: {e}')}\n")
            failedUsers += 1
            continue
        failedMessages += len(report.failures)
        out.write(
            f"exported {counted(report.messages, 'message')} ({counted(report.octets, 'octet')}) "
            f"of {address} to {_shown(directory)}\n"
        )
        leftBehind = _notExported(store, address)
        if leftBehind:
            args.stderr.write(f"mailgate: {_shown(f'{address}: not in the export: ' + '; '.join(leftBehind))}\n")
    if failedUsers:
        raise CommandError(f"{counted(failedUsers, 'user')} could not be exported (named above)", EX_CANTCREAT)
    if failedMessages:
        raise CommandError(
            f"{counted(failedMessages, 'message')} could not be read (deleted meanwhile, or the database "
            "failed); export again into a new directory for a complete copy",
            EX_TEMPFAIL,
        )


def _notExported(store, address):
    """
    What a Maildir cannot carry of a user's and the export leaves behind,
    each said rather than dropped unseen: the deleted messages kept for
    recovery (a Maildir has live messages only; Dovecot's
    C{pop3_deleted_flag} keyword would hide them for good, not keep them
    restorable) and the user's own quota (an account's setting, not the
    mailbox's).
    """
    said = []
    kept = sum(1 for _ in _forUser(address, store.listDeleted(address, page=LISTING_PAGE)))
    if kept:
        said.append(
            f"{counted(kept, 'deleted message')} kept for recovery (mailbox restore {address} before exporting "
            "takes them along)"
        )
    status = _forUser(address, store.quotaOf(address))
    if status is not None and (status.ownOctets is not None or status.ownMessages is not None):
        said.append(f"its own quota (user quota {address} ... on the new server)")
    return said


def _mailboxShow(store, args, out, stdin):
    """
    One message's octets on standard output, as POP3's RETR gives them
    (before dot-stuffing), as C{doveadm fetch text} does: read without
    the maildrop's lock.
    """
    from mailgate.importers import fired

    address = args.address
    messages = _forUser(address, store.exportMessages(address))
    wanted = args.message
    # A number first, as POP3 numbers them; else a unique id.
    found = [m for m in messages if str(m.number) == wanted] or [m for m in messages if m.uniqueId == wanted]
    if not found:
        raise CommandError(
            f"{address} has no message {wanted[:80]!r} (a number or a unique id of mailbox list)", EX_DATAERR
        )
    message = found[0]
    sink = getattr(out, "buffer", None)
    while True:
        piece = fired(message.body.read())
        if not piece:
            break
        if sink is not None:
            sink.write(piece)
        else:
            out.write(bytes(piece).decode("utf-8", "surrogateescape"))


def _addMailboxCommands(commands):
    """
    C{mailgate mailbox ...}: a user's messages, listed, expunged, restored, shown and exported.
    """
    mailbox = commands.add_parser("mailbox", help="list, expunge, restore and export a user's messages").add_subparsers(
        dest="action", metavar="ACTION"
    )
    mailbox.required = True
    mlist = mailbox.add_parser(
        "list",
        help="list a user's messages as POP3 numbers them",
        description="List a user's messages as a POP3 session would number them: number, "
        "octets, unique id, arrival time (UTC); then the use and quota (not with --json).",
    )
    mlist.add_argument("address", metavar="ADDRESS")
    _addJSON(mlist)
    mlist.set_defaults(run=_mailboxList, migrate=True, readOptions=_readAddresses("address"), readsOnly=True)
    mdeleted = mailbox.add_parser(
        "deleted",
        help="list a user's messages deleted by POP3 and kept for recovery (--keep-deleted-days)",
        description="List a user's messages deleted by POP3 and kept for recovery "
        "(--keep-deleted-days): unique id, octets, when deleted (UTC) and from which client address, "
        "with the master user whose login deleted them where one did (a helpdesk's, a backup tool's); "
        "mailbox restore brings them back.",
    )
    mdeleted.add_argument("address", metavar="ADDRESS")
    _addJSON(mdeleted)
    mdeleted.set_defaults(
        run=_mailboxDeleted, migrate=True, readOptions=_readAddresses("address"), readsOnly=True
    )
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
    mrestore.set_defaults(
        run=_mailboxRestore, migrate=True, readOptions=_readAddresses("address", then=_mailboxRestoreOptions),
        audit=audit.Audited("mailbox restore", "address"),
    )
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
    mexpunge.set_defaults(
        run=_mailboxExpunge, migrate=True, readOptions=_mailboxExpungeOptions,
        audit=audit.Audited("mailbox expunge", "address"),
    )
    mshow = mailbox.add_parser(
        "show",
        help="write one message to standard output, as POP3 serves it",
        description="Write one message of a user's to standard output, its octets as POP3's "
        "RETR gives them (CRLF line ends, before dot-stuffing): MESSAGE is its number or its "
        "unique id, as mailbox list shows them.  Read without the maildrop's lock.",
    )
    mshow.add_argument("address", metavar="ADDRESS")
    mshow.add_argument("message", metavar="MESSAGE")
    mshow.set_defaults(run=_mailboxShow, migrate=True, readOptions=_readAddresses("address"), readsOnly=True)
    mexport = mailbox.add_parser(
        "export",
        # argparse would write the operands as ADDRESS DIR | DIR [ADDRESS
        # DIR | DIR ...]: the two forms README's synopsis gives instead.
        usage="%(prog)s [-h] (ADDRESS DIR | --all DIR)",
        help="copy a user's messages out as a Maildir that Dovecot serves with the same unique ids",
        description="Write a user's messages into DIR (made if missing; refused if it holds a "
        "mailbox already) as a Maildir with a dovecot-uidlist: Dovecot, or mailgate import "
        "maildir, then serves the same messages in the same order under the same POP3 unique "
        "ids, so clients that leave mail on the server download nothing again.  Reads without "
        "the maildrop's lock: allowed while the user is in a POP3 session.  Files are "
        "readable by their owner only: give them to the mail account that will serve them.",
    )
    mexport.add_argument(
        "operands", nargs="+", metavar="ADDRESS DIR",
        help="the user and the directory to write into; with --all, the directory alone",
    )
    mexport.add_argument(
        "--all", action="store_true",
        help="every user, each into DIR/ADDRESS (Dovecot: mail_location = maildir:DIR/%%u)",
    )
    mexport.set_defaults(run=_mailboxExport, migrate=True, readOptions=_mailboxExportOptions, readsOnly=True)
