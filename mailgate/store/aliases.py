# -*- test-case-name: tests.test_aliases_store -*-
"""
Aliases: other addresses of a user.

An alias is an address whose mail is one user's (C{abuse@example.org}
for bob, C{info@example.net} for alice), as Postfix's
C{virtual_alias_maps} gives it when mailgate receives mail directly and
no MTA in front rewrites the address: SMTP, LMTP and C{mailgate deliver}
take mail to it as mail to the user, quota and all; POP3 logins never use
it.  An alias names one user (an address for several people is a list,
which is the MTA's work): so one RCPT is one maildrop, and LMTP's one
reply per recipient says what happened to its one copy.  An alias
C{@example.org} (L{mailgate.address.CATCH_ALL}) is the domain's
catch-all: the recipient look-up asks it last, for an address of the
domain no user, alias or detail of either has.

The table holds the alias, its domain (an alias's domain is accepted
mail for, as a user's is) and the user's id: a rename takes the aliases
along, and a user's deletion removes them (L{mailgate.store.lifecycle}).
An address is a user's or an alias, never both: adding either checks the
other (a race of two nodes is settled at delivery, where the user's
address wins, and C{mailgate db check} names it).

The statements run on a cursor inside a transaction, as those of
L{mailgate.store.sql}.
"""

from mailgate.errors import AliasExists, NoSuchAlias, NoSuchUser, UserExists
from mailgate.records import AliasRecord

#: An alias with the address of its user, if the user is there (an alias
#: whose user was removed by hand, not with C{mailgate user del}, has
#: none: no mail reaches it).
_ALIASES = "SELECT a.address, u.address FROM aliases a LEFT JOIN users u ON u.user_id = a.user_id "


def _aliasTarget(cursor, address):
    """
    The address of the user C{address} is an alias of, or C{None}.
    """
    cursor.execute(
        "SELECT u.address FROM aliases a JOIN users u ON u.user_id = a.user_id WHERE a.address = ?", (address,)
    )
    row = cursor.fetchone()
    return None if row is None else row[0]


def _aliasTargets(cursor, addresses):
    """
    The aliases among C{addresses} that name a user, each to the address
    of its user: one statement for an alias and its domain's catch-all
    (L{mailgate.smtp.delivery.LocalDelivery}'s look-up of a recipient no
    user has).
    """
    marks = ", ".join("?" * len(addresses))
    cursor.execute(
        f"SELECT a.address, u.address FROM aliases a JOIN users u ON u.user_id = a.user_id "
        f"WHERE a.address IN ({marks})",
        list(addresses),
    )
    return dict(cursor.fetchall())


def refuseAlias(cursor, address):
    """
    Refuse C{address} as a new user's address (L{mailgate.store.sql._addUser},
    a rename) where it is an alias of a user.

    @raise AliasExists: if it is.
    """
    target = _aliasTarget(cursor, address)
    if target is not None:
        raise AliasExists(address, target)


def aliasesAmong(cursor, addresses):
    """
    Which of C{addresses} are aliases of a user (C{mailgate user import}
    adds a batch of users in one statement: those are refused as taken).
    """
    if not addresses:
        return set()
    marks = ", ".join("?" * len(addresses))
    cursor.execute(
        f"SELECT a.address FROM aliases a JOIN users u ON u.user_id = a.user_id WHERE a.address IN ({marks})",
        list(addresses),
    )
    return {row[0] for row in cursor.fetchall()}


def _addAlias(cursor, alias, address, now):
    """
    Make C{alias} an alias of the user C{address}.

    @return: C{True}, or C{False} if it was that user's alias already.
    @raise UserExists: if C{alias} is a user's address.
    @raise NoSuchUser: if there is no user C{address}.
    @raise AliasExists: if C{alias} is another user's alias.
    """
    cursor.execute("SELECT 1 FROM users WHERE address = ?", (alias,))
    if cursor.fetchone() is not None:
        raise UserExists(alias)
    cursor.execute("SELECT user_id FROM users WHERE address = ?", (address,))
    row = cursor.fetchone()
    if row is None:
        raise NoSuchUser(address)
    userId = row[0]
    cursor.execute(f"{_ALIASES}WHERE a.address = ?", (alias,))
    row = cursor.fetchone()
    if row is not None:
        if row[1] == address:
            return False
        if row[1] is not None:
            raise AliasExists(alias, row[1])
        # The alias of a user removed by hand: no one's; given anew.
        cursor.execute("DELETE FROM aliases WHERE address = ?", (alias,))
    # Not there when looked at; another command may have added it since
    # (PostgreSQL): ON CONFLICT, which does not abort the transaction as a
    # unique violation would, and the alias read again.
    cursor.execute(
        "INSERT INTO aliases (address, domain, user_id, created_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (address) DO NOTHING",
        (alias, alias.rpartition("@")[2], userId, now),
    )
    if cursor.rowcount != 1:
        target = _aliasTarget(cursor, alias)
        if target == address:
            return False
        raise AliasExists(alias, target or "another user")
    return True


def _addAliases(cursor, pairs, now):
    """
    Add each of C{pairs}, C{(alias, address)}, as L{_addAlias} adds one,
    in the one transaction (C{mailgate alias import}).

    @return: for each, in order, what L{_addAlias} returned or the
        L{UserExists}, L{NoSuchUser} or L{AliasExists} it raised (each
        found by a look-up, the alias inserted by none: the batch's other
        aliases are added in the same transaction all the same).
    """
    outcomes = []
    for alias, address in pairs:
        try:
            outcomes.append(_addAlias(cursor, alias, address, now))
        except (UserExists, NoSuchUser, AliasExists) as e:
            outcomes.append(e)
    return outcomes


def _removeAlias(cursor, alias):
    """
    Remove the alias C{alias}.

    @return: the address of the user it was an alias of (C{None}: a user
        removed by hand).
    @raise NoSuchAlias: if it is no alias.
    """
    cursor.execute(f"{_ALIASES}WHERE a.address = ?", (alias,))
    row = cursor.fetchone()
    if row is None:
        raise NoSuchAlias(alias)
    cursor.execute("DELETE FROM aliases WHERE address = ?", (alias,))
    return row[1]


def _listAliases(cursor, address=None):
    """
    The aliases (of the user C{address}, or all), as L{AliasRecord}s in
    the code point order of the aliases.

    @raise NoSuchUser: if C{address} is given and there is no such user.
    """
    if address is None:
        cursor.execute(_ALIASES)
    else:
        cursor.execute("SELECT 1 FROM users WHERE address = ?", (address,))
        if cursor.fetchone() is None:
            raise NoSuchUser(address)
        cursor.execute(f"{_ALIASES}WHERE u.address = ?", (address,))
    # In Python: the databases' collations order text differently, and
    # the aliases of a site are a few hundred, not a user table's millions.
    return sorted((AliasRecord(alias, target) for alias, target in cursor.fetchall()), key=lambda a: a.alias)
