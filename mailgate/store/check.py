# -*- test-case-name: tests.test_db_check -*-
"""
C{mailgate db check}: whether a database is sound, for an administrator
to run from cron or after an incident (a disk error, a restore, a crash),
beside a running server.

Two kinds of checks.  SQLite's own (C{PRAGMA quick_check}, or
C{integrity_check} with C{full}): every page of every table and index
readable and well formed; PostgreSQL has its own tool for its pages
(C{pg_amcheck}).  Then mailgate's invariants, on either engine, each one
statement whose answer is a count and a few examples, so that memory
stays bounded whatever the size of the database and however many rows
are wrong: every user has her maildrop's counters; every message its
user and its body, and its body's size; every body as many references as messages hold it,
and chunks adding up to its size; each maildrop's recorded use what its
messages take; its next unique id past every one given; where there are
aliases, each alias its user, and no address both a user's and an alias;
where there are master users, each stored under the name logins give it,
and its allowed networks each a network; given the judgement of a login
(C{hashProblem}), each user's and master user's password hash one it
can check a password against.  (mailgate's
tables declare no foreign keys: these are the references a foreign key
check would have followed.)

Read-only: each check is one transaction that refuses writes (SQLite's
C{query_only}, PostgreSQL's C{READ ONLY} transaction), which a role that
may only read the tables runs as well; nothing is repaired and nothing
migrated.  Each may take L{TIMEOUT} seconds, or what the administrator
gives, on PostgreSQL rather than a node's 60 (L{mailgate.interfaces.
IEngine.administrativeRead}): one statement reading every message of a
large database takes longer, and failed as a temporary failure that
came back at every run.  A check that meets damaged pages says so and
the others go on.
"""

import time

from mailgate.address import masterName
from mailgate.errors import DatabaseDamaged, InvalidAddress, TemporaryFailure
from mailgate.networks import LOCAL, parseNetwork
from mailgate.printable import printable

#: examples shown of what a check found wrong
EXAMPLES = 5

#: problems SQLite's own check reports at most (it stops there)
SQLITE_PROBLEMS = 20

#: seconds a check may take by default (C{db check --timeout})
TIMEOUT = 3600


class CheckTooLong(Exception):
    """
    A check ran out of its time (L{checkDatabase}'s C{timeout}).

    @ivar name: the check.
    @ivar timeout: its seconds.
    """

    def __init__(self, name, timeout):
        super().__init__(name, timeout)
        self.name = name
        self.timeout = timeout


class Finding:
    """
    The outcome of one check.

    @ivar name: what was checked, for people.
    @ivar problems: how many things are wrong (0: sound).
    @ivar examples: a few of them, each a line.
    @ivar advice: what to do about them.
    @ivar damaged: the check met damaged pages (SQLite's words), or
        C{None}.
    """

    def __init__(self, name, problems=0, examples=(), advice="", damaged=None):
        self.name = name
        self.problems = problems
        self.examples = list(examples)
        self.advice = advice
        self.damaged = damaged

    @property
    def sound(self):
        return self.problems == 0 and self.damaged is None

    def lines(self):
        """
        The finding, as lines for people.
        """
        if self.damaged is not None:
            return [f"{self.name}: not checked: a page it reads is damaged ({self.damaged})"]
        if self.sound:
            return [f"{self.name}: ok"]
        more = self.problems - len(self.examples)
        shown = [f"  {example}" for example in self.examples]
        if more > 0:
            shown.append(f"  and {more} more")
        return [f"{self.name}: {self.advice}", *shown]


def _sqliteCheck(cursor, engine, full, timeout):
    # Refusing writes: a check never repairs, whatever a mistake in it
    # would do.
    engine.administrativeRead(cursor, timeout)
    pragma = "integrity_check" if full else "quick_check"
    cursor.execute(f"PRAGMA {pragma}({SQLITE_PROBLEMS})")
    said = [row[0] for row in cursor.fetchall()]
    if said == ["ok"]:
        return []
    # A row may hold several lines; its first names the database.
    return [line for row in said for line in row.splitlines() if line and not line.startswith("*** in database")]


def _reason(damaged):
    """
    SQLite's own words under a L{DatabaseDamaged} ("database disk image
    is malformed"), without the file and the advice repeated at each
    check.
    """
    cause = damaged.__cause__
    return str(cause) if cause is not None else str(damaged)


def _counted(cursor, engine, timeout, query, args=()):
    """
    Run C{query}, whose rows end with a count of all its rows (C{count(*)
    OVER ()}), limited to L{EXAMPLES}: the count and the examples.
    """
    engine.administrativeRead(cursor, timeout)
    cursor.execute(f"{query} LIMIT {EXAMPLES}", args)
    rows = cursor.fetchall()
    if not rows:
        return 0, []
    return int(rows[0][-1]), [row[:-1] for row in rows]


# Each invariant: (what it checks, query, how to show a row, advice).
_USERS_WITHOUT_MAILDROP = (
    "users and their maildrops",
    "SELECT u.address, count(*) OVER () FROM users u LEFT JOIN mailboxes b ON b.user_id = u.user_id "
    "WHERE b.user_id IS NULL ORDER BY u.address",
    lambda address: f"{address}: no maildrop counters (mailboxes row)",
    "users without their maildrop's counters: their logins and deliveries fail; restore the database",
)

_MESSAGES_WITHOUT_USER = (
    "messages and their users",
    "SELECT x.user_id, count(*) OVER () FROM ("
    "SELECT DISTINCT user_id FROM maildrop WHERE user_id NOT IN (SELECT user_id FROM users) "
    "UNION SELECT DISTINCT user_id FROM deleted_mail WHERE user_id NOT IN (SELECT user_id FROM users)"
    ") x ORDER BY x.user_id",
    lambda userId: f"user number {userId}: messages, and no such user",
    "messages of users that do not exist: nobody can read them, and their storage is not given back",
)

# Each message whose body's row is missing, with what its body's chunks
# hold: the octets, how many chunks, the last one's number (one more than
# their count when none is missing), and the octets its body should have
# (its size less its copy's own fields).  The chunks are summed for these
# few messages only, not for every body as the chunk check does.
_BODY_ROW_MISSING = (
    "SELECT u.address, x.user_id, x.uid, x.uidl, x.size - x.own AS want, "
    "(SELECT sum(length(c.data)) FROM body_chunks c WHERE c.owner_id = x.body_owner AND c.body_id = x.body_id) "
    "AS octets, "
    "(SELECT count(*) FROM body_chunks c WHERE c.owner_id = x.body_owner AND c.body_id = x.body_id) AS chunks, "
    "(SELECT max(c.seq) FROM body_chunks c WHERE c.owner_id = x.body_owner AND c.body_id = x.body_id) AS last "
    "FROM ("
    "SELECT m.user_id, m.uid, m.uidl, m.body_owner, m.body_id, m.size, coalesce(length(p.prefix), 0) AS own "
    "FROM maildrop m LEFT JOIN maildrop_prefixes p ON p.user_id = m.user_id AND p.uid = m.uid "
    "UNION ALL SELECT user_id, uid, uidl, body_owner, body_id, size, coalesce(length(prefix), 0) FROM deleted_mail"
    ") x LEFT JOIN bodies b ON b.owner_id = x.body_owner AND b.body_id = x.body_id "
    "LEFT JOIN users u ON u.user_id = x.user_id WHERE b.body_id IS NULL"
)
_CONTENT_WHOLE = "m.chunks > 0 AND m.chunks = m.last + 1 AND m.octets = m.want"

_MESSAGES_WITHOUT_BODY = (
    "messages and their bodies",
    f"SELECT m.address, m.uid, m.uidl, count(*) OVER () FROM ({_BODY_ROW_MISSING}) m "
    f"WHERE NOT ({_CONTENT_WHOLE}) ORDER BY m.user_id, m.uid",
    lambda address, uid, uidl: f"{address}: message uid {uid} ({uidl}) has no body",
    "messages whose body is missing: they cannot be retrieved; restore the database",
)

_BODY_ROWS_MISSING = (
    "messages and their bodies' records",
    f"SELECT m.address, m.uid, m.uidl, m.octets, count(*) OVER () FROM ({_BODY_ROW_MISSING}) m "
    f"WHERE {_CONTENT_WHOLE} ORDER BY m.user_id, m.uid",
    lambda address, uid, uidl, octets: (
        f"{address}: message uid {uid} ({uidl}) has no body record; its content is whole ({octets} octets)"
    ),
    # What a salvage (sqlite3 .dump) gives where the bodies' page was
    # damaged and the chunks' were not: the mail is there, and POP3
    # serves it.  But db copy copies chunks by their body's record, and a
    # deletion gives a body's storage back by it.
    "messages whose body's record is missing while their content is whole: POP3 serves them, but db copy "
    "leaves their content behind and their storage is never given back once they are deleted; restore the "
    "database, or have them downloaded first",
)

_MESSAGE_SIZES = (
    "messages and their sizes",
    "SELECT u.address, x.uid, x.uidl, x.size, b.size, x.header_size, b.header_size, x.own, count(*) OVER () "
    "FROM ("
    "SELECT m.user_id, m.uid, m.uidl, m.body_owner, m.body_id, m.size, m.header_size, "
    "coalesce(length(p.prefix), 0) AS own FROM maildrop m "
    "LEFT JOIN maildrop_prefixes p ON p.user_id = m.user_id AND p.uid = m.uid "
    "UNION ALL SELECT user_id, uid, uidl, body_owner, body_id, size, header_size, coalesce(length(prefix), 0) "
    "FROM deleted_mail"
    ") x JOIN bodies b ON b.owner_id = x.body_owner AND b.body_id = x.body_id "
    "LEFT JOIN users u ON u.user_id = x.user_id "
    "WHERE x.size <> b.size + x.own OR x.header_size <> b.header_size + x.own ORDER BY x.user_id, x.uid",
    lambda address, uid, uidl, size, bodySize, headerSize, bodyHeaderSize, own: (
        f"{address}: message uid {uid} ({uidl}) is recorded as {size} octets, {headerSize} of header; "
        f"its body has {bodySize}, {bodyHeaderSize} of header"
        + (f", and its copy {own} octets of its own fields before it" if own else "")
    ),
    # Every path that stores a message copies its body's sizes (plus its
    # copy's own fields, L{mailgate.store.rows.PREFIX_COLUMNS}): POP3
    # lists the message's, and RETR and TOP read the body by them (a
    # larger one ends the session at a chunk that is not there).  The
    # storage use check sums the messages' sizes, so user recount would
    # only carry the wrong size into the quota.
    "messages whose recorded size is not their body's: POP3 lists the wrong size, and RETR or TOP of "
    "them fails or is cut short; restore the database (user recount does not set it right)",
)

_PREFIXES_WITHOUT_MESSAGE = (
    "messages' own fields",
    "SELECT p.user_id, p.uid, count(*) OVER () FROM maildrop_prefixes p "
    "LEFT JOIN maildrop m ON m.user_id = p.user_id AND m.uid = p.uid "
    "WHERE m.uid IS NULL ORDER BY p.user_id, p.uid",
    lambda userId, uid: f"user number {userId}: fields of a copy (Delivered-To:) for uid {uid}, no such message",
    # Removed with their message by every path that removes one; left by
    # hand, they are storage nothing reads.
    "copies' own fields of no message: storage nothing uses",
)

_BODY_REFERENCES = (
    "bodies and the messages holding them",
    "SELECT b.owner_id, b.body_id, b.refcount, coalesce(r.held, 0), count(*) OVER () FROM bodies b LEFT JOIN ("
    "SELECT body_owner, body_id, count(*) AS held FROM ("
    "SELECT body_owner, body_id FROM maildrop UNION ALL SELECT body_owner, body_id FROM deleted_mail"
    ") x GROUP BY body_owner, body_id"
    ") r ON r.body_owner = b.owner_id AND r.body_id = b.body_id "
    "WHERE b.refcount <> coalesce(r.held, 0) ORDER BY b.owner_id, b.body_id",
    lambda owner, bodyId, refcount, held: (
        f"body {owner}/{bodyId}: counts {refcount} reference{'s' if refcount != 1 else ''}, "
        f"{held} message{'s' if held != 1 else ''} hold{'s' if held == 1 else ''} it"
    ),
    "bodies whose reference count is not the number of messages holding them: one counted too high "
    "is never removed (its storage is lost), one counted too low is removed while a message still "
    "holds it",
)

_BODY_CHUNKS = (
    "bodies and their chunks",
    "SELECT b.owner_id, b.body_id, b.size, coalesce(c.octets, 0), count(*) OVER () FROM bodies b LEFT JOIN ("
    "SELECT owner_id, body_id, sum(length(data)) AS octets, count(*) AS chunks, max(seq) AS last "
    "FROM body_chunks GROUP BY owner_id, body_id"
    ") c ON c.owner_id = b.owner_id AND c.body_id = b.body_id "
    "WHERE coalesce(c.octets, 0) <> b.size OR (c.chunks IS NOT NULL AND c.chunks <> c.last + 1) "
    "ORDER BY b.owner_id, b.body_id",
    lambda owner, bodyId, size, octets: f"body {owner}/{bodyId}: {size} octets, its chunks hold {octets}",
    "bodies whose chunks do not hold the whole message: it cannot be retrieved whole; restore the database",
)

_CHUNKS_WITHOUT_BODY = (
    "chunks and their bodies",
    "SELECT c.owner_id, c.body_id, count(*) OVER () FROM ("
    "SELECT DISTINCT owner_id, body_id FROM body_chunks"
    ") c LEFT JOIN bodies b ON b.owner_id = c.owner_id AND b.body_id = c.body_id "
    "WHERE b.body_id IS NULL "
    # Those a message holds are its content (its body's record missing).
    "AND NOT EXISTS (SELECT 1 FROM maildrop m WHERE m.body_owner = c.owner_id AND m.body_id = c.body_id) "
    "AND NOT EXISTS (SELECT 1 FROM deleted_mail d WHERE d.body_owner = c.owner_id AND d.body_id = c.body_id) "
    "ORDER BY c.owner_id, c.body_id",
    lambda owner, bodyId: f"chunks of body {owner}/{bodyId}, which does not exist",
    "chunks of no body: storage nothing uses",
)

_USE = (
    "storage use",
    "SELECT u.address, b.used_messages, b.used_octets, coalesce(m.messages, 0), coalesce(m.octets, 0), "
    "count(*) OVER () FROM mailboxes b JOIN users u ON u.user_id = b.user_id LEFT JOIN ("
    "SELECT user_id, count(*) AS messages, sum(size) AS octets FROM maildrop GROUP BY user_id"
    ") m ON m.user_id = b.user_id "
    "WHERE b.used_messages <> coalesce(m.messages, 0) OR b.used_octets <> coalesce(m.octets, 0) "
    "ORDER BY u.address",
    lambda address, messages, octets, held, heldOctets: (
        f"{address}: counts {messages} messages, {octets} octets; holds {held}, {heldOctets}"
    ),
    "maildrops whose recorded use is not what their messages take (quotas go by it): "
    "mailgate user recount ADDRESS sets it right",
)

_NEXT_UID = (
    "unique id counters",
    "SELECT u.address, b.next_uid, x.highest, count(*) OVER () FROM mailboxes b JOIN users u "
    "ON u.user_id = b.user_id JOIN ("
    "SELECT user_id, max(uid) AS highest FROM ("
    "SELECT user_id, uid FROM maildrop UNION ALL SELECT user_id, uid FROM deleted_mail"
    ") y GROUP BY user_id"
    ") x ON x.user_id = b.user_id WHERE b.next_uid <= x.highest ORDER BY u.address",
    lambda address, nextUid, highest: f"{address}: next uid {nextUid}, a message has uid {highest}",
    "maildrops whose next unique id is one given already: deliveries to them fail, or give a "
    "client an id it has seen; restore the database",
)

#: mailgate's invariants, in the order they are checked
INVARIANTS = (
    _USERS_WITHOUT_MAILDROP,
    _MESSAGES_WITHOUT_USER,
    _MESSAGES_WITHOUT_BODY,
    _BODY_ROWS_MISSING,
    _MESSAGE_SIZES,
    _PREFIXES_WITHOUT_MESSAGE,
    _BODY_REFERENCES,
    _BODY_CHUNKS,
    _CHUNKS_WITHOUT_BODY,
    _USE,
    _NEXT_UID,
)


#: The users whose address holds a character past ASCII, by engine: the
#: only ones whose normal form may have changed (an ASCII address's never
#: did).
_UTF8_ADDRESSES = {
    "sqlite": "SELECT address FROM users WHERE address GLOB '*[^ -~]*' ORDER BY address",
    "postgres": "SELECT address FROM users WHERE address ~ '[^ -~]' ORDER BY address COLLATE \"C\"",
}

_ADDRESS_FORMS = "users' UTF-8 addresses"

_ADDRESS_FORMS_ADVICE = (
    "stored in a form names are no longer read in (by an older mailgate): no login, mail or command naming "
    "them reaches them; give each the form shown, mailgate user rename 'OLD' NEW (or mailgate user del 'OLD')"
)


def _addressForms(cursor, engine, timeout, addressForm):
    """
    How many users have an address with a character past ASCII, how many
    of them are not in their own normal form (C{addressForm} of it, which
    logins, delivery and commands look users up by), and a few of those,
    each with the form it should have: a name stored by a mailgate whose
    normal form of UTF-8 names was another (c05fd1c lower-cased with
    C{str.lower} alone: C{νικοσ.παπας@}, which 364be6e reads as
    C{νικος.παπας@}) is found by no login, mail or command.  Read a
    thousand rows at a time.
    """
    engine.administrativeRead(cursor, timeout)
    cursor.execute(_UTF8_ADDRESSES[engine.name])
    seen = wrong = 0
    examples = []
    for (address,) in _rowsOf(cursor):
        seen += 1
        try:
            form = addressForm(address)
        except ValueError as e:
            form, why = None, str(e)
        if form == address:
            continue
        wrong += 1
        if len(examples) < EXAMPLES:
            examples.append(f"{address}: now {form}" if form is not None else f"{address}: {why}")
    return seen, wrong, examples


def _rowsOf(cursor):
    """
    The rows of C{cursor}'s query, read a thousand at a time: a check of
    every user holds a thousand of them, not all.
    """
    while rows := cursor.fetchmany(1000):
        yield from rows


#: The users whose logins are restricted to some networks (C{mailgate
#: user networks}), by engine, in code point order of their addresses.
_RESTRICTED_USERS = {
    "sqlite": "SELECT address, allowed_nets FROM users WHERE allowed_nets IS NOT NULL ORDER BY address",
    "postgres": (
        "SELECT address, allowed_nets FROM users WHERE allowed_nets IS NOT NULL ORDER BY address COLLATE \"C\""
    ),
}

_ALLOWED_NETWORKS = "users' allowed networks"

_ALLOWED_NETWORKS_ADVICE = (
    "stored networks that are no network (written by hand): no client is on them, so these users cannot "
    "log in; give them again, mailgate user networks ADDRESS NETWORKS (or any)"
)


def _networksProblem(stored):
    """
    What in stored allowed networks lets no client in as a login reads
    them (L{mailgate.networks.peerAllowed}: each item C{local} or a
    network, anything else matching no client), or C{None}.  Read so, not
    by what C{user networks} takes (L{mailgate.networks.
    parseAllowedNetworks}): it takes C{any}, C{LOCAL} and nothing, and
    stores none of them, but stored by hand each lets no client in, and
    the check said they were sound.
    """
    items = stored.split(",")
    for item in items:
        if item and item != LOCAL:
            try:
                parseNetwork(item)
            except ValueError:
                return f"not a network or address: {item!r}"
    if not any(items):
        return f"no network or address at all: {stored!r}"
    return None


def _namedProblems(cursor, engine, timeout, query, problemOf):
    """
    Read the rows C{query} selects (by engine: a name and a stored value),
    a thousand at a time, and judge each value with C{problemOf} (its
    problem as text, or C{None}).

    @return: how many rows, how many with a problem, and a few of those,
        each as C{name: problem}.
    """
    engine.administrativeRead(cursor, timeout)
    cursor.execute(query[engine.name])
    seen = wrong = 0
    examples = []
    for name, stored in _rowsOf(cursor):
        seen += 1
        problem = problemOf(stored)
        if problem is not None:
            wrong += 1
            if len(examples) < EXAMPLES:
                examples.append(f"{printable(name)}: {problem}")
    return seen, wrong, examples


def _restrictedNetworks(query):
    """
    A check of the allowed networks C{query} reads (by engine: a name and
    its stored networks, for those restricted to some): how many are
    restricted, how many hold what lets no client in (L{_networksProblem}),
    and a few of those, each with it: their logins are refused while
    nothing else says why.  Read a thousand rows at a time.
    """

    def check(cursor, engine, timeout):
        return _namedProblems(cursor, engine, timeout, query, _networksProblem)

    return check


_allowedNetworks = _restrictedNetworks(_RESTRICTED_USERS)


#: Master users (C{mailgate master}), by engine, in code point order of
#: their names; those restricted to some networks.
_MASTER_USERS = {
    "sqlite": "SELECT name FROM master_users ORDER BY name",
    "postgres": "SELECT name FROM master_users ORDER BY name COLLATE \"C\"",
}

_RESTRICTED_MASTER_USERS = {
    "sqlite": "SELECT name, allowed_nets FROM master_users WHERE allowed_nets IS NOT NULL ORDER BY name",
    "postgres": (
        "SELECT name, allowed_nets FROM master_users WHERE allowed_nets IS NOT NULL ORDER BY name COLLATE \"C\""
    ),
}

_MASTER_NAMES = "master users' names"

_MASTER_NAMES_ADVICE = (
    "stored in a form no login names them by (written by hand): no login reaches them, nor do mailgate master "
    "passwd, networks and test; remove each, mailgate master del --as-stored 'NAME' (quoted as shown), and add it "
    "again, mailgate master add NAME"
)

_MASTER_NETWORKS = "master users' allowed networks"

_MASTER_NETWORKS_ADVICE = (
    "stored networks that are no network (written by hand): no client is on them, so these master users cannot "
    "log in; give them again, mailgate master networks NAME NETWORKS (or any)"
)

_masterNetworks = _restrictedNetworks(_RESTRICTED_MASTER_USERS)


def _masterNames(cursor, engine, timeout):
    """
    How many master users there are, how many of them have a name that is
    not in its own form (L{masterName}: a login looks the master user up
    by the name it gives in that form, so C{Admin} is never found, nor a
    name that is none, C{bad name}), and a few of those, each with its
    form or why it has none.  Read a thousand rows at a time.
    """
    engine.administrativeRead(cursor, timeout)
    cursor.execute(_MASTER_USERS[engine.name])
    seen = wrong = 0
    examples = []
    for (name,) in _rowsOf(cursor):
        seen += 1
        try:
            form = masterName(name)
        except InvalidAddress as e:
            form, why = None, str(e)
        if form == name:
            continue
        wrong += 1
        if len(examples) < EXAMPLES:
            shown = repr(printable(name))
            examples.append(f"{shown}: logins name it {form}" if form is not None else f"{shown}: {why}")
    return seen, wrong, examples


#: Users' and master users' password hashes, by engine, in code point
#: order of their names.
_USER_HASHES = {
    "sqlite": "SELECT address, password_hash FROM users ORDER BY address",
    "postgres": "SELECT address, password_hash FROM users ORDER BY address COLLATE \"C\"",
}

_MASTER_HASHES = {
    "sqlite": "SELECT name, password_hash FROM master_users ORDER BY name",
    "postgres": "SELECT name, password_hash FROM master_users ORDER BY name COLLATE \"C\"",
}

_USER_HASHES_NAME = "users' password hashes"

_USER_HASHES_ADVICE = (
    "password hashes no login can check (written by hand or by a tool): every login of these users by "
    "password (USER/PASS, AUTH PLAIN or LOGIN) fails; give each a new one, mailgate user passwd ADDRESS"
)

_MASTER_HASHES_NAME = "master users' password hashes"

_MASTER_HASHES_ADVICE = (
    "password hashes no login can check (written by hand or by a tool): every login of these master users "
    "fails; give each a new one, mailgate master passwd NAME"
)


def _storedHashes(query):
    """
    A check of the password hashes C{query} reads (by engine: a name and
    its hash): how many there are, how many no login can check (the
    C{hashProblem} given, L{mailgate.auth.passwords.hashProblem}: what a
    login's check refuses whatever the password, judged without hashing),
    and a few of those, each with why, never the hash.  Read a thousand
    rows at a time.
    """

    def check(cursor, engine, timeout, hashProblem):
        return _namedProblems(cursor, engine, timeout, query, hashProblem)

    return check


_userHashes = _storedHashes(_USER_HASHES)
_masterHashes = _storedHashes(_MASTER_HASHES)


#: Aliases (C{mailgate alias add}): checked where there are any, as the
#: UTF-8 names are (a site without aliases has no line about them).
_ANY_ALIAS = "SELECT 1 FROM aliases LIMIT 1"

_ALIASES_WITHOUT_USER = (
    "aliases and their users",
    "SELECT a.address, a.user_id, count(*) OVER () FROM aliases a LEFT JOIN users u ON u.user_id = a.user_id "
    "WHERE u.user_id IS NULL ORDER BY a.address",
    lambda alias, userId: f"{alias}: its user (number {userId}) is no longer there",
    # A user removed with SQL, not with user del (which removes the
    # aliases): delivery finds no user behind the alias.
    "aliases of users removed by hand (not with mailgate user del): they reach no one, mail to them is "
    "refused as to no such user; remove each, mailgate alias del ALIAS, or give it to a user, "
    "mailgate alias add ALIAS USER",
)

_ADDRESSES_OF_BOTH = (
    "aliases and users' addresses",
    "SELECT a.address, t.address, count(*) OVER () FROM aliases a JOIN users u ON u.address = a.address "
    "LEFT JOIN users t ON t.user_id = a.user_id ORDER BY a.address",
    lambda address, target: (
        f"{address}: a user's address, and an alias of {target if target is not None else 'a user no longer there'}"
    ),
    # The commands refuse it, but two nodes' commands at once on
    # PostgreSQL each see the address free; delivery looks the user up
    # first (mailgate.smtp.delivery).
    "addresses that are both a user's and an alias (commands of two nodes at once): mail to them is "
    "the user's, the alias reaches no one; remove the alias, mailgate alias del ADDRESS",
)

#: the invariants of aliases, in the order they are checked
ALIAS_INVARIANTS = (_ALIASES_WITHOUT_USER, _ADDRESSES_OF_BOTH)


def _anyAlias(cursor, engine, timeout):
    engine.administrativeRead(cursor, timeout)
    cursor.execute(_ANY_ALIAS)
    return cursor.fetchone() is not None


def _whereSeen(database, name, timeout, advice, check, *args):
    """
    The finding of a check listed only where what it looks at is there at
    all (users with UTF-8 names, users restricted to networks): C{check}
    gives C{(seen, wrong, examples)}; nothing if it saw none.
    """
    try:
        seen, wrong, examples = _timed(database, name, timeout, check, *args)
    except DatabaseDamaged as e:
        return [Finding(name, damaged=_reason(e))]
    return [Finding(name, wrong, examples, advice)] if seen else []


def _invariant(database, engine, timeout, name, query, show, advice):
    """
    The L{Finding} of one invariant (L{INVARIANTS}).
    """
    try:
        count, rows = _timed(database, name, timeout, _counted, engine, timeout, query)
    except DatabaseDamaged as e:
        return Finding(name, damaged=_reason(e))
    return Finding(name, count, [show(*row) for row in rows], advice)


def _timed(database, name, timeout, function, *args):
    """
    C{database.run(function, *args)}, a check named C{name} that may take
    C{timeout} seconds.

    @raise CheckTooLong: its statement was ended by its time bound once
        its time was out: the database is not unavailable, the check
        needs longer.  Any other temporary failure (a lost connection, a
        locked SQLite file, which no C{--timeout} changes) is raised as
        it is, whenever it came.
    """
    started = time.monotonic()
    try:
        return database.run(function, *args)
    except TemporaryFailure as e:
        timedOut = database.engine.isStatementTimeout(e.__cause__)
        if timedOut and timeout is not None and time.monotonic() - started >= timeout:
            raise CheckTooLong(name, timeout) from e
        raise


def checkDatabase(database, full=False, invariants=True, timeout=TIMEOUT, addressForm=None, hashProblem=None):
    """
    Check C{database} (an L{mailgate.interfaces.IDatabase} run inline:
    the command's), one read-only transaction a check.

    @param full: SQLite's C{integrity_check}, which also compares every
        index with its table, rather than C{quick_check}.
    @param invariants: check mailgate's invariants too (its tables are
        those of this mailgate's schema version).
    @param timeout: seconds each check may take (where the engine bounds
        a statement's time), or C{None} for as long as it takes.
    @param addressForm: the normal form of a user's address
        (L{mailgate.address.normalizeAddress}, raising L{ValueError} for
        what is none), or C{None}: with it, and users whose address is
        UTF-8, whether they are stored in it (a check listed only where
        there are such users).
    @param hashProblem: why no login can check a password against a stored
        hash, or C{None} if one can (L{mailgate.auth.passwords.
        hashProblem}), or C{None}: with it, where there are users (master
        users), whether each one's hash is one a login can check.
    @return: the L{Finding}s, in order.
    @raise CheckTooLong: a check did not end within C{timeout}.
    """
    engine = database.engine
    findings = []
    if engine.name == "sqlite":
        name = "SQLite's integrity_check" if full else "SQLite's quick_check"
        advice = f"the file {engine.path} is damaged: restore it from its last backup (README: Backups)"
        try:
            said = _timed(database, name, timeout, _sqliteCheck, engine, full, timeout)
        except DatabaseDamaged as e:
            # The check itself stopped at a page too damaged to walk.
            said = [_reason(e)]
        findings.append(Finding(name, len(said), said[:EXAMPLES], advice))
    for invariant in INVARIANTS if invariants else ():
        findings.append(_invariant(database, engine, timeout, *invariant))
    if invariants and addressForm is not None:
        findings += _whereSeen(
            database, _ADDRESS_FORMS, timeout, _ADDRESS_FORMS_ADVICE, _addressForms, engine, timeout, addressForm
        )
    if invariants and hashProblem is not None:
        # Listed where there are users, as the UTF-8 names.
        findings += _whereSeen(
            database, _USER_HASHES_NAME, timeout, _USER_HASHES_ADVICE, _userHashes, engine, timeout, hashProblem
        )
    if invariants:
        # Listed where some user is restricted, as the UTF-8 names.
        findings += _whereSeen(
            database, _ALLOWED_NETWORKS, timeout, _ALLOWED_NETWORKS_ADVICE, _allowedNetworks, engine, timeout
        )
    if invariants:
        try:
            aliases = _timed(database, ALIAS_INVARIANTS[0][0], timeout, _anyAlias, engine, timeout)
        except DatabaseDamaged as e:
            findings.append(Finding(ALIAS_INVARIANTS[0][0], damaged=_reason(e)))
        else:
            for invariant in ALIAS_INVARIANTS if aliases else ():
                findings.append(_invariant(database, engine, timeout, *invariant))
    if invariants:
        # Listed where there are master users (where some is restricted).
        findings += _whereSeen(database, _MASTER_NAMES, timeout, _MASTER_NAMES_ADVICE, _masterNames, engine, timeout)
        findings += _whereSeen(
            database, _MASTER_NETWORKS, timeout, _MASTER_NETWORKS_ADVICE, _masterNetworks, engine, timeout
        )
        if hashProblem is not None:
            findings += _whereSeen(
                database, _MASTER_HASHES_NAME, timeout, _MASTER_HASHES_ADVICE, _masterHashes, engine, timeout,
                hashProblem,
            )
    return findings
