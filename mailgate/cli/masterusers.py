# -*- test-case-name: tests.test_master_users_cli -*-
"""
C{mailgate master ...}: master users, names and passwords that log in
to any user's maildrop, as Dovecot's master users do (see
L{mailgate.store.masterusers}).

A master user's password is read as a user's is (C{--password-stdin},
or twice on the terminal; C{--hashed} for a hash another server made,
a Dovecot master passdb's), and only its hash is kept: master logins
are USER/PASS and SASL PLAIN, so no SCRAM keys and no APOP secret.
"""

from mailgate.address import masterName
from mailgate.auth.passwords import makeCredentials
from mailgate.cli import audit
from mailgate.auth.passwords import verifyPassword
from mailgate.cli.common import (
    CommandError,
    EX_CANTCREAT,
    EX_DATAERR,
    EX_NOPERM,
    EX_NOUSER,
    EX_USAGE,
    _addHashed,
    _addJSON,
    _addPasswordStdin,
    _address,
    _checkNewPassword,
    _checkPasswordSource,
    _clientAddress,
    _givenHash,
    _hashKept,
    _jsonLines,
    _networksArgument,
    _networksChanged,
    _networksSaid,
    _readPassword,
    _result,
    _time,
)
from mailgate.errors import InvalidAddress, MasterUserExists, NoSuchMasterUser
from mailgate.printable import leftAligned, printable

#: what a master user is, for the help texts
_WHAT = (
    "A master user is a name and a password that log in to any user's maildrop, as Dovecot's "
    "master users do (for a helpdesk, a backup, a migration tool), on the servers started with "
    "--master-users: by AUTH PLAIN with the user as the authorisation identity and the master user "
    "as the authentication identity, or, with --master-user-separator *, by USER user*master and "
    "the master user's password. A master user is not a mailbox: it receives no mail, has no "
    "address, and its name is apart from the users' addresses."
)


def _readName(args):
    """
    The C{NAME} argument, normalised (L{masterName}): one refused is bad
    data (65), said before the database is opened.
    """
    try:
        args.name = masterName(args.name)
    except InvalidAddress as e:
        raise CommandError(str(e), EX_DATAERR) from None


def _passwordHash(args, password):
    """
    The hash kept for what was read: mailgate's own of a password, or with
    C{--hashed} the hash another server made, checked as C{user add
    --hashed} checks it.
    """
    if args.hashed:
        return _givenHash(password).passwordHash
    _checkNewPassword(password)
    return makeCredentials(password, apop=False).passwordHash


def _readNetworks(args):
    """
    C{NETWORKS} (C{master networks}, C{master add --networks}), read before
    the database is opened: their canonical text, C{None} for C{any}, as
    C{user networks} reads a user's.
    """
    if args.networks is None:
        return
    args.networks = _networksArgument(args.networks)


def _masterAddOptions(args):
    _readName(args)
    _readNetworks(args)
    # The password (or hash) too, before the database is opened, as user
    # add reads it: one refused leaves no database file made.
    args.passwordHash = _passwordHash(args, _readPassword(args, args.stdin))


def _masterPasswdOptions(args):
    _readName(args)
    _checkPasswordSource(args, args.stdin)


def _masterNetworksOptions(args):
    _readName(args)
    _readNetworks(args)


def _masterTestOptions(args):
    """
    C{master test}'s options, read before the database is opened, as
    C{user test} reads its own: the name, C{--from} (C{args.peer}),
    C{--user} normalised, the password's source.
    """
    _readName(args)
    args.peer = None if args.client is None else _clientAddress(args.client)
    if args.user is not None:
        args.user = _address(args.user)
    _checkPasswordSource(args, args.stdin)


def _masterTest(store, args, out, stdin):
    """
    Check a master user's password as a master login would (Dovecot's
    C{doveadm auth test}, as C{user test} does a user's), without logging
    in, changing nothing.  With the right password, what else refuses its
    logins is said too: the networks it may log in from (and whether a
    client at C{--from} is on them), and with C{--user}, what of that
    user's own state refuses a master login to their maildrop (no such
    user, disabled, the user's networks), which applies to it as to the
    user's own.  A wrong password is told as before, whatever the rest.
    """
    name = args.name
    master = _result(store.findMasterUser(name))
    if master is None:
        raise _noSuchMasterUser(name)
    password = _readPassword(args, stdin, confirm=False)
    if not verifyPassword(password.encode("utf-8"), master.passwordHash):
        raise CommandError(f"that is not the password of the master user {name}", EX_NOPERM)
    out.write(f"the password of the master user {name} is correct (kept as {_hashKept(master.passwordHash)})\n")
    refusals = []
    refused = _networksSaid(out, args, f"the master user {name}", master.allowedNetworks, "mailgate master networks")
    if refused is not None:
        refusals.append(refused)
    address = args.user
    if address is not None:
        refusals += _userRefusals(store, args, out, address)
    if refusals:
        to = f" to the maildrop of {address}" if address is not None else ""
        raise CommandError(
            f"the password is right, but a login of the master user {name}{to} is refused: {' and '.join(refusals)}",
            EX_NOPERM,
        )


def _userRefusals(store, args, out, address):
    """
    C{master test --user}'s lines on the user a master login names: the
    user's own rules apply to it (L{mailgate.auth.checkers.
    MasterPasswordChecker}), all but the password.

    @return: what refuses such a login.
    """
    summary = _result(store.userSummary(address))
    if summary is None:
        out.write(f"there is no user {address}: a master login to that maildrop is refused as a wrong password is\n")
        return [f"no such user {address}"]
    refusals = []
    if summary.disabledAt is not None:
        reason = f" ({printable(summary.disabledReason)})" if summary.disabledReason else " (no reason given)"
        out.write(
            f"{address} is disabled since {_time(summary.disabledAt)}{reason}: a master login to their maildrop is "
            f"refused as their own are (mailgate user enable {address} lets them in again)\n"
        )
        refusals.append(f"{address} is disabled")
    else:
        out.write(f"{address} is a user, and not disabled\n")
    refused = _networksSaid(out, args, address, summary.allowedNetworks, "mailgate user networks", f"{address}'s")
    if refused is not None:
        refusals.append(refused)
    return refusals


def _audited(args):
    """
    How the password was set, for the audit line (never it, nor its hash).
    """
    return " (a password hash given)" if args.hashed else ""


def _noSuchMasterUser(name):
    return CommandError(f"no such master user: {name}", EX_NOUSER)


def _masterAdd(store, args, out, stdin):
    name = args.name
    try:
        _result(store.addMasterUser(name, args.passwordHash, args.networks))
    except MasterUserExists:
        raise CommandError(f"master user {name} already exists", EX_CANTCREAT) from None
    only = f", from {args.networks} only" if args.networks else ""
    out.write(
        f"added the master user {name}: it logs in to any user's maildrop where the server allows master "
        f"logins (--master-users){only}\n"
    )
    audit.outcome(args, f"added{only}{_audited(args)}")


def _masterPasswd(store, args, out, stdin):
    name = args.name
    # Asked for only once it is known to be there.
    if _result(store.findMasterUser(name)) is None:
        raise _noSuchMasterUser(name)
    passwordHash = _passwordHash(args, _readPassword(args, stdin))
    try:
        _result(store.setMasterUserPassword(name, passwordHash))
    except NoSuchMasterUser:
        # Removed while the password was typed.
        raise _noSuchMasterUser(name) from None
    out.write(f"password changed for the master user {name}: the old one fails from the next login on\n")
    audit.outcome(args, f"password changed{_audited(args)}")


def _masterDelOptions(args):
    """
    C{master del}'s C{NAME}, read before the database is opened: kept as
    given (C{args.given}) and, unless C{--as-stored}, normalised
    (C{args.normal}, C{None} for no name, with why in C{args.refusal}).
    A row written by hand (SQL, a tool) may hold a name that is not in its
    normal form, C{Admin} or C{bad name}, which C{db check} names: NAME as
    given is what reaches it.
    """
    args.given = args.name
    args.normal = args.refusal = None
    try:
        args.name.encode("utf-8")
    except UnicodeEncodeError:
        # Octets that are not UTF-8 on the command line: no name, stored
        # or not, is such text.
        raise CommandError("NAME is not UTF-8 text: no master user is named so", EX_DATAERR) from None
    if args.as_stored:
        return
    try:
        args.normal = masterName(args.name)
    except InvalidAddress as e:
        args.refusal = str(e)
    else:
        args.name = args.normal


def _masterDel(store, args, out, stdin):
    """
    Remove a master user: the one NAME names as logins name it; where
    there is none, the row stored as NAME is given (one written by hand,
    in no normal form, that db check names), so that no SQL is needed to
    remove it.  NAME naming both, a master user (C{Admin}: C{admin}) and a
    row stored so (C{Admin}), is refused: which one is meant, the command
    cannot tell; C{--as-stored} names the row exactly.
    """
    given, normal = args.given, args.normal
    if args.as_stored or normal == given:
        return _removed(store, args, out, given)
    there = normal is not None and _result(store.findMasterUser(normal)) is not None
    stored = _result(store.findMasterUser(given)) is not None
    if there and stored:
        raise CommandError(
            f"{_shownName(given)} names both the master user {normal} and a master user stored as "
            f"{_shownName(given)} (written by hand): mailgate master del {normal} removes the first, "
            f"mailgate master del --as-stored {_shownName(given)} the second",
            EX_USAGE,
        )
    if stored:
        return _removed(store, args, out, given)
    if normal is None:
        # No name, and no row stored so: refused as before, bad data.
        raise CommandError(args.refusal, EX_DATAERR)
    return _removed(store, args, out, normal)


def _removed(store, args, out, name):
    """
    Remove the master user stored as C{name}, and say so: a name in no
    normal form is quoted (as db check shows it) and said to be no
    login's.
    """
    args.name = name
    try:
        _result(store.removeMasterUser(name))
    except NoSuchMasterUser:
        if args.as_stored:
            raise CommandError(f"no master user is stored as {_shownName(name)}", EX_NOUSER) from None
        raise _noSuchMasterUser(name) from None
    if _isNormal(name):
        out.write(
            f"removed the master user {name}: its logins are refused from the next one on "
            "(sessions it opened go on)\n"
        )
        audit.outcome(args, "removed")
        return
    out.write(
        f"removed the master user stored as {_shownName(name)} (written by hand, in a form no login names it by: "
        "no login reached it)\n"
    )
    audit.outcome(args, f"removed, stored as {_shownName(name)}")


def _isNormal(name):
    """
    Whether C{name} is a master user's name in its normal form (as
    mailgate master stores it and logins look it up).
    """
    try:
        return masterName(name) == name
    except InvalidAddress:
        return False


def _shownName(name):
    """
    A stored name as db check shows it: quoted, anything unprintable as
    C{?}.
    """
    return repr(printable(name))


def _masterNetworks(store, args, out, stdin):
    """
    Hold a master user to some networks (the C{allow_nets} of Dovecot's
    master passdb), or with C{any} lift that: on every node from the next
    login.  Said as C{user networks} says a user's.
    """
    name, networks = args.name, args.networks
    try:
        previous = _result(store.setMasterUserNetworks(name, networks))
    except NoSuchMasterUser:
        raise _noSuchMasterUser(name) from None
    _networksChanged(
        out, args, f"the master user {name}", previous, networks,
        "its logins from elsewhere are refused on every server as a wrong password is",
    )


def _masterList(store, args, out, stdin):
    masters = _result(store.listMasterUsers())
    if args.json:
        return _jsonLines(out, (
            {
                "name": m.name,
                "added": _time(m.createdAt),
                # As user list --json gives a user's: a list, or null for anywhere.
                "allowed_networks": None if m.allowedNetworks is None else m.allowedNetworks.split(","),
            }
            for m in masters
        ))
    width = max([len("NAME"), *(len(m.name) for m in masters)])
    out.write(f"{'NAME':<{width}}  {'ADDED':<20}  NETWORKS\n")
    for m in masters:
        out.write(f"{leftAligned(m.name, width)}  {_time(m.createdAt):<20}  {m.allowedNetworks or 'any'}\n")


def _addMasterUserCommands(commands):
    """
    C{mailgate master add|passwd|networks|test|del|list}.
    """
    master = commands.add_parser(
        "master",
        help="manage master users, who log in to any user's maildrop (Dovecot's master users)",
        description=_WHAT,
    ).add_subparsers(dest="action", metavar="ACTION")
    master.required = True
    add = master.add_parser(
        "add",
        help="add a master user",
        description=f"{_WHAT} Add the master user NAME (1 to 128 letters, digits and . _ - @; capitals "
        "are taken as small letters) with a password asked for on the terminal, or read with "
        "--password-stdin: its first line, UTF-8, at most 1024 octets. Only a hash of it is kept. "
        "One that exists already is left as it is (exit 73).",
    )
    add.add_argument("name", metavar="NAME")
    _addPasswordStdin(add)
    add.add_argument(
        "--networks",
        metavar="NETWORKS",
        help="let it log in only from these networks (as master networks NAME NETWORKS): comma-separated "
        "CIDR networks or addresses, local, or any",
    )
    _addHashed(add, kept="kept as it is, master logins checked against it (a Dovecot master passdb's hashes)")
    add.set_defaults(
        run=_masterAdd, migrate=True, create=True, readOptions=_masterAddOptions,
        audit=audit.account("master add", "name"),
    )
    passwd = master.add_parser(
        "passwd",
        help="change a master user's password",
        description="Change the password of the master user NAME (asked for on the terminal, or read with "
        "--password-stdin). The old one fails from the next login on, on every server. Exit 67 if "
        "there is no master user NAME.",
    )
    passwd.add_argument("name", metavar="NAME")
    _addPasswordStdin(passwd)
    _addHashed(passwd, kept="kept as it is, master logins checked against it (a Dovecot master passdb's hashes)")
    passwd.set_defaults(
        run=_masterPasswd, migrate=True, readOptions=_masterPasswdOptions,
        audit=audit.account("master passwd", "name"),
    )
    networks = master.add_parser(
        "networks",
        help="restrict the networks a master user may log in from (Dovecot's allow_nets)",
        description="Let the master user NAME log in only from NETWORKS, as the allow_nets of a Dovecot "
        "master passdb: comma-separated CIDR networks or addresses (IPv4 and IPv6), and local for "
        "clients with no IP address (a Unix socket); any lifts the restriction. The address checked is "
        "the client's, on every server sharing the database, from the next login. From elsewhere its "
        "right password is refused as a wrong one is. The user's own networks (user networks) apply "
        "as well: both must let the client in. Exit 67 if there is no master user NAME.",
    )
    networks.add_argument("name", metavar="NAME")
    networks.add_argument("networks", metavar="NETWORKS|any")
    networks.set_defaults(
        run=_masterNetworks, migrate=True, readOptions=_masterNetworksOptions,
        audit=audit.account("master networks", lambda args: f"{args.name} {args.networks or 'any'}"),
    )
    delete = master.add_parser(
        "del",
        help="remove a master user",
        description="Remove the master user NAME: its logins are refused from the next one on, on every "
        "server; sessions it opened go on to their end (mailgate kick ends them). The users and "
        "their mail are untouched. Exit 67 if there is no master user NAME. A master user stored by "
        "hand under a name in no normal form (Admin, bad name: db check names them) is removed by "
        "that name as stored where no master user has the name as logins give it; where both exist "
        "(Admin and admin) the command refuses (exit 64) and --as-stored names the row exactly.",
    )
    delete.add_argument("name", metavar="NAME")
    delete.add_argument(
        "--as-stored",
        action="store_true",
        help="remove the master user stored exactly as NAME, without reading NAME as logins do "
        "(capitals as small letters): a name written by hand that db check names",
    )
    delete.set_defaults(
        run=_masterDel, migrate=True, readOptions=_masterDelOptions, audit=audit.account("master del", "name")
    )
    test = master.add_parser(
        "test",
        help="check a master user's password without logging in",
        description="Check a master user's password as a master login would (as doveadm auth test, and "
        "user test for a user): exit 0 if it is right, 77 if not.  With the right password it also says "
        "the networks the master user may log in from, and with --user what of that user's own state "
        "refuses a master login to their maildrop (no such user, disabled, the user's networks); exit 77 "
        "too if something refuses it, --from naming a client on none of the networks.  Nothing is "
        "changed.  Exit 67 if there is no master user NAME.",
    )
    test.add_argument("name", metavar="NAME")
    test.add_argument(
        "--from",
        dest="client",
        metavar="ADDRESS",
        help="the client's IP address (or local, for a Unix socket's), as the server sees it: whether the "
        "master user's networks (and the user's, with --user) let a login from there in",
    )
    test.add_argument(
        "--user",
        metavar="ADDRESS",
        help="the user whose maildrop the master login names: whether the user's own state refuses it",
    )
    _addPasswordStdin(test)
    test.set_defaults(run=_masterTest, migrate=True, readOptions=_masterTestOptions, readsOnly=True)
    listing = master.add_parser(
        "list",
        help="list the master users",
        description="List the master users, in the code point order of their names, each with when it "
        "was added (UTC) and the networks it may log in from.",
    )
    _addJSON(listing)
    listing.set_defaults(run=_masterList, migrate=True, readsOnly=True)
