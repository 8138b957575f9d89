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
    EX_NOUSER,
    _addJSON,
    _address,
    _forUser,
    _jsonLines,
    _readAddresses,
    _result,
)
from mailgate.errors import AliasExists, NoSuchAlias, UserExists


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


def _domainNote(args, alias):
    """
    A note where the server's configuration file (C{--config}) lists the
    domains it takes mail for and the alias's is not one: its mail is
    refused as relaying until the domain is added.
    """
    domains = getattr(args, "domains", None)
    domain = alias.rpartition("@")[2]
    if domains and domain not in domains:
        return (
            f"note: {domain} is not among the configuration's domains: the server refuses mail to "
            f"{alias} (relay access denied) until it is\n"
        )
    return ""


def _aliasAdd(store, args, out, stdin):
    alias, address = args.alias, args.address
    if alias == address:
        raise CommandError(f"{alias} is the user's own address: an alias is another one", EX_CANTCREAT)
    try:
        added = _forUser(address, store.addAlias(alias, address))
    except UserExists:
        raise CommandError(f"{alias} is a user's address: an address is a user's or an alias", EX_CANTCREAT)
    except AliasExists as e:
        raise CommandError(
            f"{alias} is an alias of {e.target}: remove it first (mailgate alias del {alias})", EX_CANTCREAT
        )
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
    if args.json:
        return _jsonLines(out, ({"alias": a.alias, "user": a.address} for a in aliases))
    width = max([len("ALIAS"), *(len(a.alias) for a in aliases)])
    out.write(f"{'ALIAS':<{width}}  USER\n")
    for a in aliases:
        # An alias whose user was removed by hand (not with user del):
        # no mail reaches it (db check names it).
        out.write(f"{a.alias:<{width}}  {a.address if a.address is not None else '- (no such user)'}\n")


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
    aliasList = alias.add_parser(
        "list",
        help="list the aliases (of one user, or all) and their users",
        description="List the aliases, of the user ADDRESS or all, in the code point order of the aliases, "
        "each with the user whose mail it is. Exit 67 if there is no user ADDRESS.",
    )
    aliasList.add_argument("address", metavar="ADDRESS", nargs="?")
    _addJSON(aliasList)
    aliasList.set_defaults(run=_aliasList, migrate=True, readsOnly=True, readOptions=_readAddresses("address"))
