# -*- test-case-name: tests.test_cli -*-
"""
C{mailgate import ...}: bringing maildrops over from a maildir or a live
POP3 server, keeping their unique ids.
"""

import os
import time

from mailgate.cli import audit
from mailgate.cli.common import (
    CommandError,
    EX_DATAERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_NOUSER,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    _addPasswordStdin,
    _address,
    _checkPasswordSource,
    _forUser,
    _number,
    _readAddresses,
    _readPassword,
    _result,
    _shown,
)
from mailgate.store.bounds import parseSize
from mailgate.plural import counted


def _importReport(report, out, stderr, who=None):
    prefix = f"{who}: " if who else ""
    for failure in report.failures:
        stderr.write(f"mailgate: {prefix}{_shown(failure)}\n")
    # It may name a source (a maildir's path).
    out.write(f"{prefix}{_shown(report.summary())}\n")


def _importTarget(store, address):
    user = _result(store.findUser(address))
    if user is None:
        raise CommandError(f"no such user: {address} (add it with mailgate user add first)", EX_NOUSER)


def _importForget(store, args, out, stdin):
    address = args.address
    forgotten = _forUser(address, store.forgetImported(address, args.uidls or None))
    which = "" if not args.uidls else f" (of {len(set(args.uidls))} given)"
    out.write(
        f"forgot {forgotten} imported unique ids of {address}{which}; the next import brings in "
        "again those the maildrop no longer holds\n"
    )
    audit.outcome(args, f"forgot {forgotten} imported unique ids{which}")


def _soleSourceWithMirror(args):
    """
    C{--sole-source} says what a C{--mirror} run may take out: alone, it
    would do nothing, unsaid.
    """
    if args.sole_source and not args.mirror:
        raise CommandError("--sole-source goes with --mirror", EX_USAGE)


def _importMaildirOptions(args):
    from mailgate.importers.uidlformat import checkUidlFormat

    if args.uidl_format is not None:
        # Checked before the maildir is read, so that a format's own
        # mistake is not taken for one the maildir cannot serve.
        try:
            checkUidlFormat(args.uidl_format)
        except ValueError as e:
            raise CommandError(f"bad --uidl-format {args.uidl_format!r}: {e}", EX_USAGE)
    if args.deleted_flag is not None and not args.deleted_flag.strip():
        # An unset shell variable: no message carries it, and the mail POP3
        # clients deleted came back without a word.
        raise CommandError(
            "--deleted-flag is empty: give Dovecot's pop3_deleted_flag keyword (in single quotes where it begins "
            "with $, as in '$POP3Deleted', which a shell otherwise takes for a variable), or leave it out",
            EX_USAGE,
        )
    _soleSourceWithMirror(args)
    args.max_message_size = _number(args.max_message_size, parseSize, "--max-message-size", minimum=1)
    args.address = _address(args.address)
    _checkMaildir(args.directory, args.uidlist, args.uidl_format)


def _checkMaildir(directory, uidListPath, uidlFormat):
    """
    What C{import maildir} refuses of C{DIR}, C{--uidlist} and
    C{--uidl-format} before it reads a message
    (L{mailgate.importers.maildir.checkMaildir}), checked before the
    database is opened, with the exit statuses the import gives them: a
    C{DIR} that is no maildir (66; 65 for mail in another format), a
    C{--uidlist} not there (66), a format with uids where there is no uid
    list (66).  With a SQLite file not there each said "no such database
    file" (78); on PostgreSQL, only once connected.
    """
    from mailgate.importers import ImportFailed
    from mailgate.importers.maildir import OtherFormat, checkMaildir

    # They name DIR as given (a line break in it would start a line of its
    # own) and what is in it (a subdirectory whose name whoever could write
    # there chose): shown as the import's report shows its lines.
    try:
        checkMaildir(directory, uidListPath, uidlFormat)
    except OtherFormat as e:
        raise CommandError(_shown(str(e)), EX_DATAERR) from None
    except ImportFailed as e:
        raise CommandError(_shown(str(e)), EX_NOINPUT) from None


def _importMaildir(store, args, out, stdin):
    from mailgate.importers import ImportFailed
    from mailgate.importers.maildir import OtherFormat, importMaildir

    address, maxSize = args.address, args.max_message_size
    _importTarget(store, address)
    try:
        report = importMaildir(
            store, args.directory, address, args.uidl_format, int(time.time()),
            progress=lambda line: args.stderr.write(f"mailgate: {_shown(line)}\n"), uidListPath=args.uidlist,
            reuseXUidl=args.reuse_xuidl, deletedFlag=args.deleted_flag, mirror=args.mirror, maxSize=maxSize,
            decompress=args.decompress == "auto", soleSource=args.sole_source,
        )
    except OtherFormat as e:
        # Mail, but not a maildir's: bad input, not missing input.
        raise CommandError(_shown(str(e)), EX_DATAERR)
    except ImportFailed as e:
        raise CommandError(_shown(str(e)), EX_NOINPUT)
    _importReport(report, out, args.stderr)
    audit.outcome(args, report.summary())
    if report.temporary:
        # The database, or a maildir changing under the import (a live
        # Dovecot expunging): the run can simply be repeated.
        raise CommandError("the import did not complete; run it again to finish", EX_TEMPFAIL)
    if report.failures:
        raise CommandError(
            f"{counted(len(report.failures), 'message')} could not be imported; run it again once fixed", EX_DATAERR
        )


def _readUsers(path, passwords=True):
    """
    C{(address, password, login)} per line of a C{--users} file: the
    address, a space, and the password (the rest of the line); empty lines
    and lines starting with C{#} are skipped.  C{address} is the user's
    here (normalised, L{_address}); C{login} is the name as the line
    spells it, which the source is given: a source may tell spellings
    apart that mailgate takes for one user (a passwd-file line in another
    Unicode form, a case-sensitive SQL passdb).

    @param passwords: whether lines have passwords; without (a master
        user logs in for everyone), a line is an address alone, and
        C{password} is C{None}.
    """
    # The path as given (a line break in it would start a line of its own,
    # an escape sequence retitle the terminal): shown as a report's lines.
    shown = _shown(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CommandError(f"cannot read {shown}: {e.strerror}", EX_NOINPUT)
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise CommandError(f"{shown} line {line}: not UTF-8 text", EX_DATAERR)
    users = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        address, _, password = line.strip().partition(" ")
        if passwords and not password:
            raise CommandError(f"{shown} line {number}: expected ADDRESS PASSWORD", EX_DATAERR)
        if not passwords and password:
            raise CommandError(
                f"{shown} line {number}: expected an ADDRESS alone (the master user's password "
                f"serves every user)", EX_DATAERR,
            )
        try:
            users.append((_address(address), password or None, address))
        except CommandError as e:
            if not passwords:
                raise CommandError(f"{shown} line {number}: {e}", e.code) from None
            # Not quoted: with the columns swapped, or a tab between
            # them, the word is the password.
            raise CommandError(
                f"{shown} line {number}: its first word is not an address (expected ADDRESS PASSWORD, "
                f"separated by a space)", EX_DATAERR,
            ) from None
    return users


def _pop3URL(url, parseURL, ImportFailed):
    """
    The parts of an import's source URL, as L{parseURL} finds them, or a
    usage error: for what it refuses, what L{urllib.parse} cannot split
    (C{pop3://[::1}) and port 0, which it would take for "no port".
    """
    from urllib.parse import urlsplit

    from mailgate.urls import shownURL

    try:
        parts = parseURL(url)
        port = urlsplit(url).port
    except ImportFailed as e:
        raise CommandError(_shown(str(e)), EX_USAGE)
    except ValueError as e:
        raise CommandError(f"bad URL {shownURL(url)!r}: {e}", EX_USAGE)
    if port == 0:
        raise CommandError(f"bad port in {shownURL(url)!r}: 0", EX_USAGE)
    return parts


def _masterRefused(address, master, refusal):
    """
    The end of an import through a master user whose first login was
    refused: with a wrong master password or separator every login would
    be, each after the source's delay for failed logins (Dovecot's grows to
    15 seconds), hours of refusals for a few thousand users, ending in a
    "run it again" that could not help.
    """
    return CommandError(_shown(
        f"{address}: {refusal}; stopped: no login through the master user {master} has worked yet, "
        f"and with a wrong master password or --master-separator (the source's "
        f"auth_master_user_separator) every one would be refused; check them (or, if the source "
        f"has no {address}, take it off the list) and run the import again"),
        EX_NOPERM,
    )


def _importPOP3Options(args):
    """
    C{import pop3}'s URL, options and C{--users} file, read before the
    database is opened (and before the source is contacted): a bad one is
    refused whatever the database's state, as what it is.
    """
    from mailgate.importers import ImportFailed
    from mailgate.importers.pop3 import parseURL

    _, _, _, urlUser, urlPassword = _pop3URL(args.url, parseURL, ImportFailed)
    if urlUser is not None and any(c in urlUser for c in "\r\n\0"):
        # As the importer refuses it, once connected (69 then).
        raise CommandError("the user name holds a line break or a NUL, which POP3 cannot send", EX_USAGE)
    if urlPassword is not None:
        # Not taken: a command line is in the process list, for every user
        # of the machine to read (and in shell histories).
        raise CommandError(
            "the source's password does not go in the URL, where every user of this machine can "
            "read it in the process list: give it on standard input (--password-stdin) or at the prompt",
            EX_USAGE,
        )
    if args.mirror and args.delete:
        # The next run would find the source without what this one
        # deleted from it, and take it out here.
        raise CommandError("--mirror and --delete do not go together: --delete empties the source", EX_USAGE)
    _soleSourceWithMirror(args)
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
    else:
        if args.address is None:
            raise CommandError("give the ADDRESS to import into (or --users FILE)", EX_USAGE)
        # The source is given the name as written (see _readUsers).
        args.login = args.address
        args.address = _address(args.address)
        if master is not None and args.master_separator in args.address:
            raise _separatorIn(args.master_separator)
    args.max_message_size = _number(args.max_message_size, parseSize, "--max-message-size", minimum=1)
    # What is wrong with the command line is said before what is wrong
    # in the file.
    if args.users is not None:
        args.accounts = _readUsers(args.users, passwords=master is None)
        for _, password, _ in args.accounts:
            # Blanked in the audit line, should a source's refusal quote it.
            audit.secret(args, password)
    else:
        args.accounts = [(args.address, None, args.login)]
    if args.users is None or master is not None:
        # A password to read (the master user's, or the ADDRESS's), as
        # once the file was read.
        _checkPasswordSource(args, args.stdin)


def _separatorIn(separator):
    """
    The refusal of an address to import through the master user that
    holds the master separator.
    """
    # The source splits the login at the first one.
    return CommandError(
        f"the address has the master separator {separator!r} in it, where the source would split the login; "
        f"import it with its own password",
        EX_DATAERR,
    )


def _importPOP3(store, args, out, stdin):
    from mailgate.importers import ImportFailed, ImportReport
    from mailgate.importers.pop3 import LoginRefused, SourceBusy, importPOP3, passes

    master, maxSize, users = args.master_user, args.max_message_size, args.accounts
    total = ImportReport()
    # Users not complete: for a reason that may pass (their login, the
    # connection, the database), and only for messages that every run
    # would leave out the same way.
    failedUsers = []
    lastingUsers = []
    masterPassword = None
    # Whether a user's mail came through the master user in this run.
    masterWorks = False
    for done, (address, password, written) in enumerate(users, 1):
        try:
            _importTarget(store, address)
            login = written
            if master is not None:
                # Dovecot's master users: "alice@example.org*migrator"
                # logs in as alice with the master user's password.
                if args.master_separator in address:
                    # A line of --users (an ADDRESS is refused before the
                    # database is opened): the other users are imported.
                    raise _separatorIn(args.master_separator)
                if masterPassword is None:
                    masterPassword = _readPassword(args, stdin, confirm=False)
                password, login = masterPassword, f"{written}{args.master_separator}{master}"
            elif password is None:
                password = _readPassword(args, stdin, confirm=False)
            # With --users, a warning names its user, as the failures do.
            who = f"{address}: " if args.users is not None else ""
            report = importPOP3(
                store, args.url, address, password, user=login, insecure=args.insecure, delete=args.delete,
                warn=lambda line, who=who: args.stderr.write(f"mailgate: {who}{_shown(line)}\n"), maxSize=maxSize,
                # Through a master user, the maildrop is still the user's:
                # the same source as with the user's own password; and the
                # same whatever the spelling the login was given.
                mirror=args.mirror, sourceUser=address,
                soleSource=args.sole_source,
            )
        except (CommandError, ImportFailed) as e:
            if args.users is None:
                # The same verdict as a user's of --users: a failure that
                # passes (the connection failing, the source busy) is 75,
                # so a script retrying on 75 finishes the import.
                # It may name the URL's host as given, or the source's words.
                raise CommandError(
                    _shown(str(e)), getattr(e, "code", EX_TEMPFAIL if passes(e) else EX_UNAVAILABLE)
                )
            if master is not None and not masterWorks and isinstance(e, LoginRefused):
                raise _masterRefused(address, master, e) from None
            # A maildrop in use ([IN-USE], or [LOGIN-DELAY]) answers a
            # login that was right; [SYS/TEMP] may come before any check.
            masterWorks = masterWorks or (isinstance(e, SourceBusy) and "[SYS/TEMP]" not in str(e).upper())
            args.stderr.write(f"mailgate: {address}: {_shown(str(e))}\n")
            (failedUsers if passes(e) else lastingUsers).append(address)
            audit.outcome(args, _importedSoFar(done, users, total))
            out.write(f"{address}: failed\n")
            out.flush()
            continue
        masterWorks = True
        _importReport(report, out, args.stderr, address if args.users is not None else None)
        # The progress of a long run, as it goes: through a pipe (tee, a
        # log), the lines would wait for the end, or be lost with a kill.
        out.flush()
        if report.failures:
            (failedUsers if report.temporary else lastingUsers).append(address)
        total.add(report)
        audit.outcome(args, _importedSoFar(done, users, total) if args.users is not None else report.summary())
    if args.users is not None:
        incomplete = len(failedUsers) + len(lastingUsers)
        incomplete = f"; {incomplete} of the users not complete" if incomplete else ""
        out.write(f"{counted(len(users), 'user')}: {total.summary()}{incomplete}\n")
        audit.outcome(args, f"{counted(len(users), 'user')}: {total.summary()}{incomplete}")
    if failedUsers:
        also = f" (for {', '.join(lastingUsers)}, once what is said above is fixed)" if lastingUsers else ""
        raise CommandError(
            f"the import of {', '.join(failedUsers)} did not complete; run it again to finish{also}",
            EX_TEMPFAIL,
        )
    if lastingUsers:
        # "Run it again" would bring the same failures back, for ever in
        # a script that retries on 75.
        raise CommandError(
            f"the import of {', '.join(lastingUsers)} did not complete (see above), for reasons that "
            f"running it again does not change",
            EX_DATAERR,
        )


def _importedSoFar(done, users, total):
    """
    How far an import of several users went, for its audit line should
    it stop before the end.
    """
    return f"{done} of {counted(len(users), 'user')} done: {total.summary()}"


def _pop3Target(args):
    from mailgate.urls import shownURL

    return f"{shownURL(args.url)} {args.address if args.users is None else '--users ' + args.users}"


#: --mirror's help, for import maildir and import pop3 alike
_MIRROR_HELP = (
    "a run after an earlier one: also take out of the maildrop what an earlier import from the same source brought "
    "in and the source no longer has (deleted there since, by a client or its retention), which leave-on-server "
    "clients would download again; kept for recovery (mailgate mailbox deleted)"
)
#: --sole-source's help, for both
_SOLE_SOURCE_HELP = (
    "with --mirror, where this source alone filled the address: also take out what the source no longer "
    "has that was imported before mailgate recorded which source each unique id came from (schema version 14) "
    "or by a source that also brought in some of what this one has (this one by another name: a copy of the "
    "maildir, the server by another name); left in the maildrop otherwise, as it may be another source's"
)


def _addImportCommands(commands):
    """
    C{mailgate import ...}: maildrops moved from another server, keeping unique ids.
    """
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
        "a dovecot-uidlist); or as Dovecot 2.4 spells it, %%{uid | hex(8)}%%{uidvalidity | hex(8)}",
    )
    imaildir.add_argument(
        "--uidlist",
        metavar="FILE",
        help="the maildir's dovecot-uidlist, where Dovecot keeps it outside the maildir (CONTROL= in "
        "mail_location, e.g. ~/control/.INBOX/dovecot-uidlist; default: DIR/dovecot-uidlist)",
    )
    imaildir.add_argument(
        "--reuse-xuidl",
        action="store_true",
        help="where Dovecot has pop3_reuse_xuidl = yes: a message's X-UIDL header field is its unique id "
        "(a saved one still comes first, the --uidl-format after it)",
    )
    imaildir.add_argument(
        "--deleted-flag",
        metavar="KEYWORD",
        help="where Dovecot has pop3_deleted_flag = KEYWORD: the messages with that keyword (deleted by POP3 "
        "clients, no longer listed by Dovecot) are left out",
    )
    imaildir.add_argument("--mirror", action="store_true", help=_MIRROR_HELP)
    imaildir.add_argument(
        "--sole-source",
        action="store_true",
        help=_SOLE_SOURCE_HELP,
    )
    imaildir.add_argument(
        "--max-message-size",
        metavar="SIZE",
        default="50M",
        help="the largest message imported, as served (decompressed, where Dovecot's zlib plugin stored it "
        "compressed; octets, or with a unit: 100M, 1G); a larger one is reported and not imported (default: "
        "50M, the server's own default limit)",
    )
    imaildir.add_argument(
        "--decompress",
        choices=("auto", "never"),
        default="auto",
        help="auto (the default): a file beginning like compressed data (gz, bz2, xz) is imported decompressed, "
        "as a Dovecot with its zlib plugin served it, and refused if it does not decompress; never: every file "
        "as it is stored, as a Dovecot without the zlib plugin served it (a maildir never served with zlib, "
        "where a message may begin with such octets)",
    )
    imaildir.set_defaults(
        run=_importMaildir, migrate=True, readOptions=_importMaildirOptions,
        audit=audit.Audited("import maildir", lambda args: f"{args.directory} {args.address}"),
    )
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
    _addPasswordStdin(ipop3)
    ipop3.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server's certificate, and send the password to a server "
        "that offers no STLS in the clear (refused otherwise, except to this machine)",
    )
    ipop3.add_argument("--delete", action="store_true", help="delete each message from the source once imported")
    ipop3.add_argument("--mirror", action="store_true", help=_MIRROR_HELP + " (not with --delete)")
    ipop3.add_argument(
        "--sole-source",
        action="store_true",
        help=_SOLE_SOURCE_HELP,
    )
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
        "source as ADDRESS is written there (with --master-user, one ADDRESS per line)",
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
    ipop3.set_defaults(
        run=_importPOP3, migrate=True, readOptions=_importPOP3Options, audit=audit.Audited("import pop3", _pop3Target)
    )
    iforget = imports.add_parser(
        "forget",
        help="forget the unique ids imported for a user, so that the next import brings back "
        "what the user deleted since",
        description="mailgate remembers the unique ids it imported for each user after the user "
        "deletes the messages, so that a later import does not bring them back.  Forget them "
        "(those given, or all) to import such messages again on purpose: messages the maildrop "
        "still holds stay skipped; deleted mail mailgate keeps (--keep-deleted-days) comes back "
        "with mailbox restore, not by importing.",
    )
    iforget.add_argument("address", metavar="ADDRESS")
    iforget.add_argument("uidls", nargs="*", metavar="UIDL", help="only these unique ids (default: all)")
    iforget.set_defaults(
        run=_importForget, migrate=True, readOptions=_readAddresses("address"),
        audit=audit.Audited("import forget", "address"),
    )
