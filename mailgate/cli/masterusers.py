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
from mailgate.cli.common import (
    CommandError,
    EX_CANTCREAT,
    EX_DATAERR,
    EX_NOUSER,
    EX_USAGE,
    _addHashed,
    _addJSON,
    _addPasswordStdin,
    _checkNewPassword,
    _checkPasswordSource,
    _givenHash,
    _jsonLines,
    _readPassword,
    _result,
    _time,
)
from mailgate.errors import InvalidAddress, MasterUserExists, NoSuchMasterUser
from mailgate.networks import parseAllowedNetworks
from mailgate.printable import leftAligned

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
    try:
        args.networks = parseAllowedNetworks(args.networks)
    except ValueError as e:
        raise CommandError(f"NETWORKS: {e} (give CIDR networks or addresses, local, or any)", EX_USAGE) from None


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


def _masterDel(store, args, out, stdin):
    name = args.name
    try:
        _result(store.removeMasterUser(name))
    except NoSuchMasterUser:
        raise _noSuchMasterUser(name) from None
    out.write(
        f"removed the master user {name}: its logins are refused from the next one on (sessions it opened go on)\n"
    )
    audit.outcome(args, "removed")


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
    shown = networks or "any"
    if previous == networks:
        out.write(f"the master user {name} may log in from {shown} already; nothing changed\n")
        audit.outcome(args, f"{shown} already; nothing changed")
    elif networks is None:
        out.write(f"the master user {name} may log in from anywhere again (was {previous})\n")
        audit.outcome(args, f"any (was {previous})")
    else:
        out.write(
            f"the master user {name} may log in from {shown} only: its logins from elsewhere are refused on "
            "every server as a wrong password is\n"
        )
        audit.outcome(args, f"{shown} (was {previous or 'any'})")


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
    C{mailgate master add|passwd|del|list}.
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
        "their mail are untouched. Exit 67 if there is no master user NAME.",
    )
    delete.add_argument("name", metavar="NAME")
    delete.set_defaults(
        run=_masterDel, migrate=True, readOptions=_readName, audit=audit.account("master del", "name")
    )
    listing = master.add_parser(
        "list",
        help="list the master users",
        description="List the master users, in the code point order of their names, each with when it "
        "was added (UTC) and the networks it may log in from.",
    )
    _addJSON(listing)
    listing.set_defaults(run=_masterList, migrate=True, readsOnly=True)
